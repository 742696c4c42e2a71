"""Peak memory of AWQ on a checkpoint's untied LM head alone (the part that peaked the 8B AWQ
compile), with stand-in statistics of the size a 16-sample calibration gives (2,048 rows), so it
is measured in a minute instead of a 45-minute compile:

    /usr/bin/time -v python bench/head_peak.py /tmp/scale/llama31-8b
"""
import resource, sys, time
import torch
from awqc.compiler.awq import awq_graph, awq_block
from awqc.compiler.calibrate import CalibrationStats, InputStats
from awqc.compiler.model_import import load_model, weight_parts
from awqc.passes.awq_scale import SecondMoment, attention_qk_rows, find_scaling_groups
from awqc.passes.quantizer import QuantScheme

def rss_gib(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
model = load_model(sys.argv[1])
func, names = awq_graph(model)
groups, qk = find_scaling_groups(func, names), attention_qk_rows(func, names)
key, head_names = weight_parts(model.config)[-1]
weights = {n: torch.from_numpy(model.weights[n]) for n in head_names}
print(f"peak before AWQ (export + head weights): {rss_gib():.2f} GiB", flush=True)
k = model.config.hidden_size
g = torch.Generator().manual_seed(0)
stats = CalibrationStats([InputStats(("lm_head.weight",), torch.rand(k, generator=g) + 0.1,
                                     SecondMoment(rows=torch.randn(2048, k, generator=g) / 2048 ** 0.5), 8192, 2048)],
                         16, 512, {})
t0 = time.time()
res = awq_block(weights, ["lm_head.weight"], [x for x in groups if x.producer in weights], qk, stats,
                QuantScheme(group_size=128))
print(f"head AWQ {time.time() - t0:.0f} s; peak {rss_gib():.2f} GiB", flush=True)
