"""Makes the mergekit parity fixtures: a tiny Llama base, three fine-tuned models, and what the
real mergekit 0.1.5 (run_merge, as `mergekit-yaml` runs it) makes of them with ties, dare_ties
and dare_linear.

Run once by a developer through make_mergekit_fixtures.sh (which makes the pinned virtual
environment under build/); the outputs are committed beside this script and read by
tests/mergekit_parity_test.cc. Re-make them with:

    bash tests/mergekit/make_mergekit_fixtures.sh

Everything is float32. DARE draws its masks with torch.bernoulli, which edgefuse cannot
reproduce; for the DARE merges this script replaces only that draw by edgefuse's documented
one (dare_mask: a SplitMix64 stream keyed by the seed, the tensor name and the client's index
in name order, element i kept when its uniform draw is below the density), and mergekit does
everything else: the L1 rescale, the weights, the sign election and the normalising. The TIES
merges run mergekit unchanged (its magnitude pruning keeps max(1, int(density * n)) entries;
the inputs have no ties in |delta|, so torch.argsort's order does not matter).
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.numpy import load_file, save_file

import mergekit
import mergekit.merge_methods.generalized_task_arithmetic as gta
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.sparsify import RescaleNorm, SparsificationMethod, rescaled_masked_tensor

HIDDEN, HEADS, KV_HEADS, MLP, VOCAB = 8, 2, 1, 16, 32
HEAD_DIM = HIDDEN // HEADS
SCHEMA = {
    "axes": {
        "hidden": {"size": HIDDEN},
        "q": {"size": HEADS * HEAD_DIM},
        "kv": {"size": KV_HEADS * HEAD_DIM},
        "mlp": {"size": MLP},
        "vocab": {"size": VOCAB},
    },
    "tensors": {
        "model.embed_tokens.weight": ["vocab", "hidden"],
        "model.layers.0.self_attn.q_proj.weight": ["q", "hidden"],
        "model.layers.0.self_attn.k_proj.weight": ["kv", "hidden"],
        "model.layers.0.self_attn.v_proj.weight": ["kv", "hidden"],
        "model.layers.0.self_attn.o_proj.weight": ["hidden", "q"],
        "model.layers.0.mlp.gate_proj.weight": ["mlp", "hidden"],
        "model.layers.0.mlp.up_proj.weight": ["mlp", "hidden"],
        "model.layers.0.mlp.down_proj.weight": ["hidden", "mlp"],
        "model.layers.0.input_layernorm.weight": ["hidden"],
        "model.layers.0.post_attention_layernorm.weight": ["hidden"],
        "model.norm.weight": ["hidden"],
        "lm_head.weight": ["vocab", "hidden"],
    },
}
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": MLP,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_hidden_layers": 1,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
MODELS = ["m0", "m1", "m2"]  # the clients' names: their order is edgefuse's k
WEIGHTS = [1.0, 0.5, 0.75]
SCALES = [0.02, 0.03, 0.05]  # each model's delta spread
MERGES = {
    "ties": ("ties", {"density": 0.5}, {}),
    "ties_unnormalized": ("ties", {"density": 0.3}, {"normalize": False}),
    "dare_ties": ("dare_ties", {"density": 0.6}, {}),
    "dare_linear": ("dare_linear", {"density": 0.7}, {"normalize": True}),
}
SEED = 11

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def finalize(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def dare_keep(n, density, seed, key, k):
    """edgefuse's dare_mask(n, density, seed, key, k)."""
    s = finalize((seed + GAMMA) & M64)
    for c in key.encode():
        s = finalize(s ^ c)
    s = finalize(s ^ (((k + 1) * GAMMA) & M64))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(s) + i * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < density


# The merge being computed: its tensor name and the order of its non-base models.
current = {}
original_merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group
original_sparsify = gta.sparsify


def merge_group(self, group, /, **parameters):
    current["name"] = group.metadata.name
    current["models"] = [str(e.id) for e in group.non_base]
    current["next"] = 0
    return original_merge_group(self, group, **parameters)


def sparsify(tensor, density, method, rescale_norm=None, **kwargs):
    if method != SparsificationMethod.random or density >= 1:
        return original_sparsify(tensor, density, method, rescale_norm=rescale_norm, **kwargs)
    model = current["models"][current["next"]]
    current["next"] += 1
    current["draws"] = current.get("draws", 0) + 1
    k = next(i for i, m in enumerate(MODELS) if model.rstrip("/").endswith("/" + m))
    keep = dare_keep(tensor.numel(), density, SEED, current["name"], k)
    mask = torch.from_numpy(keep.reshape(tuple(tensor.shape))).to(tensor.dtype)
    return rescaled_masked_tensor(tensor, mask, rescale_norm)


gta.GeneralizedTaskArithmeticMerge.merge_group = merge_group
gta.sparsify = sparsify


def main(out_dir: Path) -> None:
    rng = np.random.default_rng(20261205)
    shapes = {}
    for name, axes in SCHEMA["tensors"].items():
        shapes[name] = tuple(SCHEMA["axes"][a]["size"] for a in axes)
    base = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in shapes.items()}
    fixtures = {f"base.{n}": v for n, v in base.items()}
    meta = {"mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else "0.1.5",
            "torch": torch.__version__, "schema": SCHEMA, "models": MODELS, "weights": WEIGHTS,
            "seed": SEED, "merges": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def write_model(name, tensors):
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(CONFIG))
            save_file(tensors, str(tmp / name / "model.safetensors"))

        write_model("base", base)
        for m, scale in zip(MODELS, SCALES):
            tuned = {n: (v + rng.normal(0, scale, v.shape)).astype(np.float32)
                     for n, v in base.items()}
            write_model(m, tuned)
            fixtures.update({f"{m}.{n}": v for n, v in tuned.items()})
        for merge, (method, per_model, shared) in MERGES.items():
            config = {
                "merge_method": method,
                "base_model": str(tmp / "base"),
                "models": [{"model": str(tmp / m), "parameters": {"weight": w, **per_model}}
                           for m, w in zip(MODELS, WEIGHTS)],
                "parameters": shared,
                "dtype": "float32",
            }
            run_merge(MergeConfiguration.model_validate(config), str(tmp / merge),
                      MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
            merged = {}
            for f in sorted((tmp / merge).glob("*.safetensors")):
                merged.update(load_file(str(f)))
            assert set(merged) == set(shapes), sorted(merged)
            if method.startswith("dare"):  # every tensor of every model drew edgefuse's mask
                assert current.pop("draws") == len(MODELS) * len(shapes)
            fixtures.update({f"{merge}.{n}": v.astype(np.float32) for n, v in merged.items()})
            meta["merges"][merge] = {"method": method, **per_model, **shared}
    save_file(fixtures, str(out_dir / "mergekit_parity.safetensors"))
    (out_dir / "mergekit_parity.safetensors").chmod(0o644)
    (out_dir / "mergekit_parity.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
