"""Fisher pass (the planner's per-module option scores) timing on a random-weight Llama, against a
baseline copy of the sensitivity module (side by side, in one process):

    git show f3e1aeb:quantfix/diagnose/sensitivity.py > /tmp/sens_old.py
    OUT=benchmarks python scripts/bench_fisher.py /tmp/sens_old.py

Writes $OUT/fisher_gpu.json. Measured: benchmarks/fisher_h100.json.
"""
import sys, time, importlib.util, json, os
sys.path.insert(0, os.getcwd())
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from quantfix.quantize import fake
from quantfix.diagnose import sensitivity as new
spec = importlib.util.spec_from_file_location("sens_old", sys.argv[1]); old = importlib.util.module_from_spec(spec)
sys.modules["sens_old"] = old; spec.loader.exec_module(old)
dev = torch.device("cuda")
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device(dev):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.requires_grad_(False)
win = torch.randint(0, 32000, (4, 512), generator=torch.Generator().manual_seed(0))
names = [n for n, m in model.named_modules() if n.endswith("proj") and ".layers." in n]
mods = dict(model.named_modules())
q = {n: fake.rtn(mods[n].weight.detach().float(), 4, 64, True).cpu() for n in names}
opts = {n: {l: fake.rtn(mods[n].weight.detach().float(), b, g, True).cpu() for l, b, g in (("W4g32", 4, 32), ("W8", 8, 0), ("W3g64", 3, 64))} for n in names}
out = {"gpu": torch.cuda.get_device_name(0), "model": "random Llama 16x2048 (0.85B), bf16", "windows": "4x512, batch 2, 2 label samples, 3 options per module"}
for tag, mod in (("old", old), ("new", new), ("old", old), ("new", new)):
    torch.cuda.synchronize(); t = time.perf_counter()
    s = mod.fisher(model, win, q, opts, mod.PassSettings(batch_size=2, label_samples=2, progress=False))
    torch.cuda.synchronize(); out[f"{tag}_s"] = round(time.perf_counter() - t, 2)
    print(tag, out[f"{tag}_s"], flush=True)
json.dump(out, open(os.environ["OUT"] + "/fisher_gpu.json", "w"), indent=2)
print(json.dumps(out))
