"""gpt-oss-20b shape on one GPU: decode and prefill speed, peak memory, and the bandwidth bound.

    python benchmarks/gpu.py                 # on an H100 / H200 (about 6-8 minutes, 14 GB of disk)
    python benchmarks/gpu.py --tiny          # small shapes: checks the script end to end, on CPU too
    python benchmarks/gpu.py --ckpt DIR      # an existing checkpoint (a real one: openai/gpt-oss-20b)

What it does, each phase timed and printed as it ends:

1. writes a random gpt-oss-20b-shaped MXFP4 checkpoint (``scripts/make_random_checkpoint.py``:
   the real names, shapes, dtypes and shards) into a temporary directory, deleted at the end;
2. ``oss_jax.load(dir, dtype="bfloat16")``: experts kept packed (MXFP4 bytes, decoded on the
   fly); everything else bf16;
3. decode at batch 1 and 32: ``oss_jax.generate`` (greedy, the whole token loop on the device)
   from 16-token prompts; tokens/s = B * (N - 1) / (t(generate) - t(its prefill)), medians of
   ``--reps`` calls after a first (compiling) call;
4. prefill of ``--prefill`` tokens (batch 1) in chunks of ``--chunk``, as ``generate`` does, under each
   expert dispatch of ``--dispatches`` (default ``auto,sorted``: ``auto`` is the grouped matmul
   ``ragged``, one ``jax.lax.ragged_dot`` per projection, on a GPU, and decode steps of fewer
   token-expert pairs than experts are ``gather``; ``sorted`` is the loop over tiles of one expert
   that the CPU uses, for comparison; if ragged is the slower, this XLA lowered ``ragged_dot`` as a
   dense matmul over every expert rather than a grouped GEMM: try again with
   ``XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true``, cuDNN's grouped matmul);
5. peak device memory (``jax.Device.memory_stats()["peak_bytes_in_use"]``);
6. the memory-bandwidth bound of SPEC.md §6: the bytes one decode step must read (bf16
   attention, router, norms and unembedding, the chosen experts' MXFP4 bytes, the KV cache) over
   the HBM bandwidth of the device (H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s, from
   ``device_kind``; ``--bandwidth`` overrides), and the fraction of it each decode reached.

``--hf`` also runs transformers' ``GptOssForCausalLM`` on the same GPU and checkpoint (needs a
CUDA build of torch; skipped with a note otherwise). One table is printed at the end and written
to ``benchmarks/results/gpu.md`` (``gpu-tiny.md`` with ``--tiny``; ``--results DIR`` elsewhere,
e.g. ``$OUT`` on a lent machine); it is rewritten after every phase, so a run cut short by a time
limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
GB, GIB = 1e9, 1024**3
PROMPT = 16

# HBM bandwidth (bytes/s, vendor figures) by a substring of jax's device_kind, most specific first.
BANDWIDTH = (("H200", 4.8e12, "H200 (4.8 TB/s)"), ("H100 PCIe", 2.0e12, "H100 PCIe (2.0 TB/s)"),
             ("H100", 3.35e12, "H100 SXM (3.35 TB/s)"))


def tiny_config():
    from oss_jax.config import Config

    return Config(vocab_size=2048, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=8, experts_per_token=2,
                  sliding_window=64, quant_method="mxfp4")


def bytes_per_step(cfg, batch: int, context: int, attn_bytes: int = 2) -> tuple[float, dict[str, float]]:
    """Bytes one decode step of ``batch`` rows must read at least (each weight once), by part.

    Experts: the expected number of distinct experts that ``batch`` tokens choose (uniform
    routing: ``E * (1 - (1 - k/E)**batch)``), each read once as MXFP4 blocks + scales and bf16
    biases. KV cache: bf16 keys and values of ``context`` positions (a sliding layer: its window).
    """
    D, F, E, k, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token, cfg.vocab_size
    N, K, H, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    attn = (D * N * H + 2 * D * K * H + N * H * D + N * H + 2 * K * H + D + N) * attn_bytes
    per_expert = (2 * F * D + D * F) // 2 + (2 * F * D + D * F) // 32 + (2 * F + D) * attn_bytes
    hit = E * (1 - (1 - k / E) ** batch)
    router_norms = (E * D + E + 2 * D) * attn_bytes
    kv = sum(2 * K * H * (context if cfg.window(i) is None else min(cfg.window(i), context)) * 2 for i in range(L))
    parts = {"attention": L * attn, "experts": L * hit * per_expert, "router+norms": L * router_norms,
             "unembedding": (V * D + D) * attn_bytes, "KV cache": batch * kv, "embedding rows": batch * D * attn_bytes}
    return sum(parts.values()), parts


def device_bandwidth(kind: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override} TB/s (--bandwidth)"
    for key, bw, name in BANDWIDTH:
        if key.lower() in kind.lower():
            return bw, name
    return None, f"unknown for {kind!r} (pass --bandwidth TB/s)"


class Report:
    """The results table, rewritten after every phase."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.rows, self.notes = path, header, [], []

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what}: {value}" + (f"  ({note})" if note else ""), flush=True)
        self.write()

    def text(self) -> str:
        lines = [*self.header, "", "| measurement | value | notes |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())


def timed(fn, reps: int) -> tuple[float, list[float]]:
    """(first call, steady calls) wall seconds; ``fn`` must block until its result is ready."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    steady = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        steady.append(time.perf_counter() - t)
    return first, steady


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes (runs on CPU in a minute)")
    p.add_argument("--ckpt", help="benchmark this checkpoint instead of writing a random one")
    p.add_argument("--workdir", help="where the random checkpoint goes (default: a temp dir, deleted)")
    p.add_argument("--batches", default="1,32", help="decode batch sizes (default 1,32)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per decode (default 64; --tiny 8)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 8192; --tiny 512)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (default 2048)")
    p.add_argument("--reps", type=int, default=2, help="steady calls per measurement (default 2)")
    p.add_argument("--dispatches", default="auto,sorted",
                   help="expert dispatches to time the prefill under (default auto,sorted; see kernels.experts)")
    p.add_argument("--bandwidth", type=float, default=None, help="HBM bandwidth in TB/s (default: by device)")
    p.add_argument("--hf", action="store_true", help="also transformers on the same device (CUDA torch)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="directory for the table")
    args = p.parse_args(argv)
    N = args.new_tokens or (8 if args.tiny else 64)
    T = args.prefill or (512 if args.tiny else 8192)
    batches = [int(b) for b in args.batches.split(",")]
    dispatches = [d.strip() for d in args.dispatches.split(",") if d.strip()]

    import jax
    import numpy as np

    import oss_jax
    from oss_jax.cache import KVCache
    from oss_jax.config import GPT_OSS_20B
    from oss_jax.kernels import experts as expert_kernels
    from oss_jax.model import compiled_apply

    if unknown := [d for d in dispatches if d not in expert_kernels.MODES]:
        p.error(f"--dispatches: unknown {', '.join(unknown)} (use {', '.join(expert_kernels.MODES)})")

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    bw, bw_name = device_bandwidth(kind, args.bandwidth)
    out = Path(args.results) / ("gpu-tiny.md" if args.tiny else "gpu.md")
    cfg = tiny_config() if args.tiny else GPT_OSS_20B
    report = Report(out, [
        "# gpt-oss-20b shape on one accelerator" + (" (--tiny: small shapes)" if args.tiny else ""),
        "",
        f"Measured by `benchmarks/gpu.py`; command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; device: {kind} ({dev.platform}, {jax.device_count()} device(s)); "
        f"HBM bandwidth used for the bound: {bw_name}",
        f"- Software: Python {platform.python_version()}, jax {jax.__version__}; host {platform.node()}",
        f"- Model: {'random gpt-oss-20b shape' if not args.ckpt else args.ckpt}"
        f"{' (tiny config)' if args.tiny else ''}; bf16, MXFP4 experts packed (decoded on the fly); "
        f"expert dispatch `auto` (what it runs: notes)",
        f"- Decode: {PROMPT}-token prompts, N = {N} new tokens, greedy; tokens/s = B * (N - 1) / "
        f"(t(generate) - t(its prefill)); median of {args.reps} calls after a first (compiling) one",
    ])
    print(f"gpu.py: device {kind}, writing {out}", flush=True)
    workdir = None
    t_all = time.perf_counter()
    try:
        # 1. checkpoint
        if args.ckpt:
            ckpt = Path(args.ckpt)
        else:
            from make_random_checkpoint import write_random_checkpoint

            workdir = Path(args.workdir or tempfile.mkdtemp(prefix="oss-jax-gpu-"))
            t = time.perf_counter()
            ckpt = write_random_checkpoint(workdir / "random-20b", cfg, shards=1 if args.tiny else 3, overwrite=True)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            report.add("write random MXFP4 checkpoint", f"{time.perf_counter() - t:.0f} s", f"{size / GB:.1f} GB")

        # 2. load
        t = time.perf_counter()
        model = oss_jax.load(ckpt, dtype="bfloat16")
        model.token_map = None
        from flax import nnx

        jax.block_until_ready(nnx.state(model))
        cfg = model.config
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        packed = model.layers[0].mlp.experts.packed
        report.add("load (bf16, experts packed)" if packed else "load (bf16, experts dense)",
                   f"{time.perf_counter() - t:.0f} s", f"{param_bytes / GIB:.2f} GiB of parameters on the device")

        rng = np.random.default_rng(0)
        V = cfg.vocab_size
        pairs = {f"prefill chunks of {min(args.chunk, T)} tokens": min(args.chunk, T) * cfg.experts_per_token,
                 **{f"decode batch {B}": B * cfg.experts_per_token for B in batches}}
        report.notes.append(f"Expert dispatch `auto` on {expert_kernels.backend()} runs: " + ", ".join(
            f"{expert_kernels.choose('auto', n, cfg.num_experts)} for the {what}" for what, n in pairs.items()) + ".")

        def prefill(toks, room):
            """generate's prefill: chunks into a cache of len + room positions; blocks on the logits."""
            B, L = toks.shape
            C = min(args.chunk, L)
            cache = KVCache.create(cfg, B, L + room, model.embed_VD[...].dtype)
            pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
            for s in range(0, L, C):
                logits, cache = compiled_apply(*nnx.split(model), jax.numpy.asarray(toks[:, s:s + C]),
                                               jax.numpy.asarray(pos[:, s:s + C]), cache, last_only=True)
            return np.asarray(logits)

        # 3. decode
        for B in batches:
            toks = rng.integers(0, V, (B, PROMPT)).astype(np.int32)
            first, steady = timed(lambda toks=toks: oss_jax.generate(model, toks, max_new_tokens=N), args.reps)
            _, pre = timed(lambda toks=toks: prefill(toks, N), args.reps)
            dt = statistics.median(steady) - statistics.median(pre)
            rate = B * (N - 1) / dt if dt > 0 else float("nan")
            need, parts = bytes_per_step(cfg, B, PROMPT + N)
            bound = B * bw / need if bw else None
            note = (f"compile {first - statistics.median(steady):.1f} s; {need / GB:.2f} GB read per step"
                    + (f"; bound {bound:,.0f} tok/s, reached {rate / bound:.0%}" if bound else ""))
            report.add(f"decode batch {B} (tok/s)", f"{rate:,.1f}", note)
            if B == 1:
                report.notes.append("Bytes per batch-1 decode step: " + ", ".join(
                    f"{k} {v / GB:.2f} GB" for k, v in parts.items()) + f"; total {need / GB:.2f} GB.")

        # 4. prefill, under each dispatch
        toks = rng.integers(0, V, (1, T)).astype(np.int32)
        C = min(args.chunk, T)
        for mode in dispatches:
            model.set_attributes(dispatch=mode)
            runs = expert_kernels.choose(mode, C * cfg.experts_per_token, cfg.num_experts)
            first, steady = timed(lambda: prefill(toks, 1), args.reps)
            report.add(f"prefill {T} tokens, dispatch {mode} (tok/s)", f"{T / statistics.median(steady):,.0f}",
                       f"runs {runs}; chunks of {C}; {statistics.median(steady):.2f} s; first call {first:.1f} s")
        model.set_attributes(dispatch="auto")

        # 5. memory
        try:
            stats = dev.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            report.add("peak device memory (GiB)", f"{stats['peak_bytes_in_use'] / GIB:.2f}",
                       f"of {stats.get('bytes_limit', 0) / GIB:.1f} GiB the allocator may use")
        else:
            import resource

            report.add("peak memory (GiB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}",
                       f"{dev.platform} has no memory_stats: peak RSS of this process instead")

        # 6. transformers, optional
        if args.hf:
            del model
            run_hf(ckpt, report, batches, N, T, args.reps)
    finally:
        if workdir is not None and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        report.notes.append(f"Total wall time {time.perf_counter() - t_all:.0f} s.")
        report.write()
    print(report.text())
    print(f"wrote {out}")
    return 0


def run_hf(ckpt: Path, report: Report, batches: list[int], N: int, T: int, reps: int) -> None:
    """transformers on the same device and checkpoint (its MXFP4 path or bf16 dequantization)."""
    try:
        import torch
        from transformers import GptOssForCausalLM
    except ImportError as e:
        report.notes.append(f"transformers not run: {e}")
        return
    if not torch.cuda.is_available():
        report.notes.append(f"transformers not run: this torch ({torch.__version__}) has no CUDA device")
        report.write()
        return
    t = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    experts = model.model.layers[0].mlp.experts
    how = "MXFP4 kept" if any("blocks" in n for n, _ in experts.named_parameters()) else "experts dequantized to bf16"
    report.add("transformers: load", f"{time.perf_counter() - t:.0f} s", how)
    rng = __import__("numpy").random.default_rng(0)
    V = model.config.vocab_size
    for B in batches:
        ids = torch.as_tensor(rng.integers(0, V, (B, PROMPT)), device="cuda")

        def gen(n, ids=ids):
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()

        _, steady = timed(lambda: gen(N), reps)
        _, one = timed(lambda: gen(1), reps)
        dt = statistics.median(steady) - statistics.median(one)
        report.add(f"transformers: decode batch {B} (tok/s)", f"{B * (N - 1) / dt:,.1f}" if dt > 0 else "n/a")
    ids = torch.as_tensor(rng.integers(0, V, (1, T)), device="cuda")

    def fwd():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()

    _, steady = timed(fwd, reps)
    report.add(f"transformers: prefill {T} tokens (tok/s)", f"{T / statistics.median(steady):,.0f}")
    report.add("transformers: peak CUDA memory (GiB)", f"{torch.cuda.max_memory_allocated() / GIB:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
