"""Builds the 8B model on the meta device as the memory model, export and the cost model do,
with a start that rewrites the backbone and distillation on; prints what is real and the max RSS."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.host_memory import peak_resident_bytes  # noqa: E402
from pst_ds.io.models import load_tokenizer  # noqa: E402
from pst_ds.layers.inject import build_model  # noqa: E402
from pst_ds.methods import method_class  # noqa: E402
from pst_ds.train.cost import model_shapes  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402
from pst_ds.train.memory import estimate, meta_model  # noqa: E402

config = load_experiment(sys.argv[1], sys.argv[2:])
method = method_class(config.method)(config)
real = {}
memory = estimate(config, load_ds_config("configs/zero3_bf16.json"), 8, on_gpu=True)
for name, model in (
    ("memory_model", meta_model(method)),
    ("export", build_model(method, load_tokenizer(config.model), None, meta=True)[0]),
):
    tensors = [*model.parameters(), *model.buffers()]
    real[name] = sum(t.numel() for t in tensors if t.device.type != "meta")
pruned, rest = model_shapes(config, 2)
print(
    json.dumps(
        {
            "init": config.pst.init,
            "distill": config.train.distill.weight,
            "teacher": method.keeps_dense_teacher(),
            "real_numel": real,
            "pruned_layers": len(pruned),
            "estimate_bytes": memory.to_dict(),
            "max_rss_bytes": peak_resident_bytes(),
        }
    )
)
