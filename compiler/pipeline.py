"""The whole compiler pipeline for a target, readable in one list."""
from __future__ import annotations

import tvm
from tvm import relax

from .targets import TargetSpec


def relax_pipeline(spec: TargetSpec) -> tvm.transform.Pass:
    """Relax → VM bytecode + TIR for one target."""
    target = spec.target()
    passes = [
        # Library dispatch (sampling, sort/scan) before ops become TIR.
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # x @ W^T becomes one NT-matmul kernel instead of a transpose plus a matmul.
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # Lowering to the VM.
        relax.transform.DeadCodeElimination(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="awqc_pipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
