"""Where the Gluon attention kernel spends its time, in causal prefills and in decode: its
GPU time (CUPTI; decode: with the combine kernel) with one part taken out, or done another
way, at a time, side by side in one run.

    PYTHONPATH=. python bench/ablate_attention.py --json out/ablate.json
    PYTHONPATH=. python bench/ablate_attention.py --cases decode --variants default,stages4

Each variant is attention_hopper.py with an edit made to a copy of its source (every edit
must match exactly once, or the run stops): the item order back to plain round-robin; the
sweep as two loops (unmasked chunks, then masked ones: two copies of the chunk step); the
next items' Q and rows no longer copied ahead (loaded when an item starts); no Q load at
all; the zeroing of V past the sweep's end gone; the causal mask gone; the output stored
row by row instead of by bulk copies (rows-out); the output store gone (row stores under a
mask that is false at run time, so nothing is compiled away); another K/V ring depth; the
two consumers unpaced instead of taking turns at the tensor cores (no-pingpong). Candidate changes ride along the same way (round 10's: positions as
int32, taken; the output stored straight from the accumulator's layout, 4-24% slower; a
tile's rows computed instead of loaded, which led to copying them ahead). A variant's time
against the default's says what that part costs. Variants that only move work around
must keep the default's bits (checked); the others compute something else and are timed
only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_info import gpu_info, header, write_json
from local_backend.kernels import attention as attn
from local_backend.kernels import attention_hopper as hopper
from profile_decode import kernel_times

HQ, HKV, D = 32, 8, 128
PREFILL = [(8, 512), (4, 1024), (2, 2048), (1, 4096), (1, 8192)]  # (B, N)
DECODE = [(1, 1000), (1, 8000), (1, 32000), (16, 4000), (64, 1000)]  # (B, L): one token per sequence
SOURCE = Path(hopper.__file__)
VARIANTS = {  # name: ([(old, new) source edits], K/V ring stages or None, keeps the default's bits)
    "default": ([], None, True),
    "round-robin": ([("return j * programs + pid + odd * (programs - 1 - 2 * pid)",
                      "return j * programs + pid + odd * 0")], None, True),
    "stages2": ([], 2, True),
    "stages4": ([], 4, True),
    "no-ahead": ([("q_ahead = two and not plan.decode and", "q_ahead = False and")], None, True),
    "no-q-load": ([("q_ahead = two and not plan.decode and", "q_ahead = False and"),
                   ("""        q = gl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)""",
                    "        q = gl.full([ROWS_, D], 0.01, q_ptr.dtype.element_ty, io)")], None, False),
    "two-loops": ([("pingpong = two and PINGPONG\n", "pingpong = False\n"), ("""        base, c_lo, c_lo, c_hi, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready, k_empty,
        v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT, STAGES,
        s_layout, o_layout, p_layout, v_io)""", """        base, c_lo, c_lo, mid, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready, k_empty,
        v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT, STAGES,
        s_layout, o_layout, p_layout, v_io)
    m, l, acc, m_all, l_all, acc_all = _sweep_range(
        base, c_lo, mid, c_hi, c_hi, mid, kv_len, pos_s, pos_o, q_buf, k_smem, v_smem, k_ready, v_ready, k_empty,
        v_empty, m, l, acc, m_all, l_all, acc_all, scale_log2e, PARTIALS, ROWS_, BLOCK_N, D, SPLIT, STAGES,
        s_layout, o_layout, p_layout, v_io)""")], None, True),
    "no-v-zeroing": ([("        _zero_past_end(v_buf, n0, kv_len, BLOCK_N, v_io)\n", "        pass\n")], None, False),
    "no-mask": ([("sees in full\n    mid = gl.minimum(gl.maximum(full_end, c_lo), c_hi)",
                  "sees in full\n    mid = c_hi + full_end * 0"),
                 ("seen in full\n    mid = gl.minimum(gl.maximum(full_end, c_lo), c_hi)",
                  "seen in full\n    mid = c_hi + full_end * 0")], None, False),
    "stages3": ([], 3, True),
    "stages6": ([], 6, True),
    "no-pingpong": ([("pingpong = two and PINGPONG\n", "pingpong = False\n")], None, True),
    "rows-out": ([("bulk_out = q_ahead and parts is None and", "bulk_out = False and")], None, True),
    "no-out-store": ([("bulk_out = q_ahead and parts is None and", "bulk_out = False and"),
                      ("""             mask=row_ok[:, None])""", """             mask=(row_ok & (tok < 0))[:, None])""")],
                     None, False),
}


def variant_module(name: str, edits: list[tuple[str, str]], folder: Path):
    """attention_hopper.py with ``edits`` made, imported from its own file (Gluon reads the source)."""
    text = SOURCE.read_text()
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"ablate_attention: variant {name}: the edit {old[:60]!r} matches {text.count(old)} times in "
                     f"{SOURCE} (it must match once: update VARIANTS to the kernel's source)")
        text = text.replace(old, new)
    path = folder / f"attention_hopper_{name.replace('-', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def run_case(B: int, N: int, modules: dict, calls: int, gen) -> dict:
    """SDPA's and every variant's kernel time on B causal sequences of N tokens."""
    k_cache = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(B, N, HKV, D, device="cuda", generator=gen).bfloat16()
    q = torch.randn(B * N, HQ, D, device="cuda", generator=gen).bfloat16()
    q_t = q.view(B, N, HQ, D).transpose(1, 2).contiguous()
    k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    row = {"B": B, "N": N, "sdpa_us": sum(kernel_times(
        lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=D ** -0.5, enable_gqa=True),
        calls).values())}
    slots = [b for b in range(B) for _ in range(N)]
    positions = list(range(N)) * B
    group_pad = HQ // HKV
    scale_log2e = D ** -0.5 * attn.LOG2_E
    reference = attn.attention(q, k_cache, v_cache, torch.tensor(slots, device="cuda"),
                               torch.tensor(positions, device="cuda"), D ** -0.5, split_kv=False)
    for name, (module, stages, same_bits) in modules.items():
        plan = module.host_plan(slots, positions, group_pad, attn.SPLIT, q.device)
        out = torch.empty_like(q)

        def call():
            module.launch(q, k_cache, v_cache, plan, out, None, scale_log2e, attn.BLOCK_N, attn.SPLIT, stages)
        row[name] = variant_figures(call, calls, out, reference if same_bits else None)
    return row


def run_decode_case(B: int, L: int, modules: dict, calls: int, gen) -> dict:
    """SDPA's and every variant's time on one new token for each of B sequences of L cached
    tokens, planned on the device and split over the sweep as the engine's decode pass is."""
    k_cache = torch.randn(B, L, HKV, D, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(B, L, HKV, D, device="cuda", generator=gen).bfloat16()
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).bfloat16()
    q_t = q[:, :, None, :].contiguous()
    k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    row = {"B": B, "N": L, "sdpa_us": sum(kernel_times(
        lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, scale=D ** -0.5, enable_gqa=True), calls).values())}
    slots = torch.arange(B, device="cuda")
    positions = torch.full((B,), L - 1, device="cuda")
    scale_log2e = D ** -0.5 * attn.LOG2_E
    with attn.one_plan_per_pass(decode_only=True):
        reference = attn.attention(q, k_cache, v_cache, slots, positions, D ** -0.5)
    for name, (module, stages, same_bits) in modules.items():
        plan = module.decode_plan(slots, positions, HQ // HKV, attn.SPLIT, L)
        split = attn._wants_split_kv(q.device, plan.tiles.shape[0] * HKV, plan.num_splits)
        out = torch.empty_like(q)
        part_m = torch.empty((B, HQ, plan.num_splits), dtype=torch.float32, device="cuda")
        part_l, part_acc = torch.empty_like(part_m), torch.empty((B, HQ, plan.num_splits, D), device="cuda")

        def call():
            module.launch(q, k_cache, v_cache, plan, out, (part_m, part_l, part_acc) if split else None,
                          scale_log2e, attn.BLOCK_N, attn.SPLIT, stages)
            if split:
                attn._combine(part_m, part_l, part_acc, out, positions, scale_log2e, plan.num_splits, HKV, None,
                              attn.GLUON_COMBINE)
        row[name] = {**variant_figures(call, calls, out, reference if same_bits else None), "split": split}
    return row


def variant_figures(call, calls: int, out: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """A variant's kernel time per call and (``reference`` given) whether its output has the
    default's bits; a variant that does not fit the case (shared memory) is reported, not fatal."""
    try:
        fig = {"us": sum(kernel_times(call, calls).values())}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    if reference is not None:
        fig["same_bits"] = bool(torch.equal(out, reference))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--cases", choices=["prefill", "decode", "all"], default="prefill")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("ablate_attention needs a Hopper GPU (sm_90): it times the Gluon kernel")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"ablate_attention: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    info = gpu_info()
    print(header(info))
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        modules = {name: (variant_module(name, VARIANTS[name][0], Path(folder)) if VARIANTS[name][0] else hopper,
                          VARIANTS[name][1], VARIANTS[name][2]) for name in names}
        print("kernel time per call (us, CUPTI); in brackets: the variant's time / the default's (default:"
              " SDPA's time / its time, the ratio to SDPA); * = not the default's bits (expected only for edits"
              " that change the math)")
        print(f"{'B x N':>9} | {'SDPA':>7} | " + " | ".join(f"{n:>16}" for n in names))
        cases = [("prefill", B, N) for B, N in PREFILL] * (args.cases != "decode") + \
            [("decode", B, L) for B, L in DECODE] * (args.cases != "prefill")
        for kind, B, N in cases:
            row = (run_case if kind == "prefill" else run_decode_case)(B, N, modules, args.calls, gen)
            row["kind"] = kind
            rows.append(row)
            base = row.get("default", {}).get("us")
            cells = []
            for n in names:
                f = row[n]
                if "error" in f:
                    cells.append("failed")
                    print(f"  {n}: {f['error']}", file=sys.stderr)
                    continue
                rel = row["sdpa_us"] / f["us"] if n == "default" else (f["us"] / base if base else float("nan"))
                flag = "" if f.get("same_bits", True) else "*"
                cells.append(f"{f['us']:>8.1f} ({rel:4.2f}){flag:1}")
            print(f"{kind[0]} {B:>2} x {N:<5}| {row['sdpa_us']:>7.1f} | " + " | ".join(f"{c:>16}" for c in cells),
                  flush=True)
            torch.cuda.empty_cache()
    write_json(args.json, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
