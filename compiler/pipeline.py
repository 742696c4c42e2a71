"""The whole compiler pipeline for a target, readable in one list."""
from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.s_tir.dlight import ApplyDefaultSchedule

from awqc.passes.shape_order import CanonicalShapeFuncOrder
from awqc.schedules.cpu import cpu_schedule_rules
from awqc.schedules.cpu_rowwise import cpu_rowwise_rules

from .targets import TargetSpec


def relax_pipeline(spec: TargetSpec) -> tvm.transform.Pass:
    """Relax → VM bytecode + TIR for one target. The int4 linears arrive already scheduled
    (quantize_linear marks them tirx.is_scheduled); this schedules everything else."""
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
        _schedule_pass(spec),
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
        # VMShapeLower's store order follows object addresses: fix it, so equal inputs give equal bytes.
        CanonicalShapeFuncOrder,
        relax.transform.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="awqc_pipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def _schedule_pass(spec: TargetSpec) -> tvm.transform.Pass:
    """The target's kernel schedules for the fused PrimFuncs."""
    if spec.device == "cuda":
        from tvm.s_tir import dlight as dl

        # A GPU kernel needs thread bindings: dlight's default rules give every unscheduled
        # PrimFunc (attention from the paged KV cache, norms, rotary, the float LM head) one.
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    # CPU: the float linear layers (NT matmuls), then norms and elementwise kernels; the rest
    # (TVM's KV-cache kernels, awqc's attention and int4 kernels) comes scheduled or lowers as is.
    return ApplyDefaultSchedule(*cpu_schedule_rules(), *cpu_rowwise_rules())


def w4_scheduler(spec: TargetSpec):
    """The int4 kernel scheduler quantize_linear uses for this target."""
    if spec.device == "cuda":
        from awqc.schedules.cuda import knobs_for, schedule_w4_cuda

        return functools.partial(schedule_w4_cuda, knobs=knobs_for(spec.name, spec.tvm_target["arch"]))
    from awqc.schedules.w4_cpu import schedule_w4

    return schedule_w4
