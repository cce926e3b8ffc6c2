"""GPU box: end-to-end decode speed against the bandwidth floor and against what users run today.

For a random-weight target shaped like Llama-3.2-1B or Llama-3.1-8B (bf16) and a matching EAGLE-3 head
(Vd = 32000), max_seq_len 64K, exported once per k in --ks (cached under --work; the draft method's chain
length is fixed at export, so each k is measured with its own program):

- ceilings measured in the same run: read bandwidth (a streaming-read kernel), copy bandwidth and the
  bf16 matmul rate;
- etspec-run paths at each context: target-only (`--no-spec`) and speculative with k in --ks, eager and
  with CUDA graphs. Random weights accept nothing, so speculative runs use the runner's benchmark-only
  acceptance simulator (`simulate_acceptance`) at the published chain acceptance of Llama-3.1-8B +
  EAGLE-3 (k=3/5/7: 2.93/3.55/3.91); every such row is labelled `simulated`;
- with `--measured-acceptance FILE` (from bench_acceptance.py): also at the acceptance a real trained
  pair measured, per prompt set (SmolLM2-135M + its head, heads/), labelled as such;
- per configuration: decode tok/s, prefill time, GPU memory in use (every process, as the driver counts
  it), ms per round split into draft / verify / host, and each against its
  bandwidth floor (bytes of weights + valid KV the call must read / measured read bandwidth), and the
  round against the copy-bandwidth floor as older results reported it;
- with `--lossless`: each k also with the program's own (untrained) draft, nothing simulated, and its
  tokens checked against target-only's (exit status 1 if any differ);
- peers on the same shapes and prompts: Hugging Face `generate` with a static cache (compiled and not),
  and a `torch.compile` decode loop of etspec's own eager model (target-only).

Writes bench/results/e2e_<shape>_<gpu>.{csv,json,png} and prints a table.

    python bench/bench_e2e.py --shape llama-3.2-1b [--phase ckpt|export|run|all] [--ks 3,5,7]
    python bench/bench_e2e.py --shape gemma-4-31b-12l --max-seq 131072 --contexts 4096,65536 --ks 5 --lossless

`--phase export --ks K` exports one k; run several such processes side by side after `--phase ckpt`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from _common import (
    Floors,
    copy_bandwidth_gbs,
    export_shaped,
    log,
    matmul_tflops,
    read_bandwidth_gbs,
    write_random_pair_once,
)

from etspec.fixtures.shaped import SHAPES
from etspec.runner.generator import SpeculativeGenerator
from etspec.runtime.program import Program

PUBLISHED_ACCEPTANCE = {3: 2.93, 5: 3.55, 7: 3.91}  # Llama-3.1-8B + EAGLE-3 chain (docs/design.md §8)
MAX_SEQ, CHUNK = 65536, 256  # MAX_SEQ: the default of --max-seq
RUN_KEYS = ("command", "device", "torch", "transformers", "read_gbs", "copy_gbs", "matmul_tflops")


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_etspec(program: Program, prompt: list[int], new: int, floors: Floors, **kw) -> dict:
    """One measured generation; a first, identical one captures every CUDA graph it will replay."""
    if kw.get("cuda_graph"):
        warm = SpeculativeGenerator(program, **kw)
        warm.eos = set()
        for _ in warm.generate(prompt, new):
            pass
    gen = SpeculativeGenerator(program, **kw)
    gen.eos = set()  # random weights: run the full budget
    tokens = [t for piece in gen.generate(prompt, new) for t in piece]
    st = gen.stats
    rounds = max(1, st.rounds)
    ctx = len(prompt) + st.generated // 2  # mid-run context for the floors
    free, total = torch.cuda.mem_get_info()
    row = {
        "tok_s": st.decode_tok_s,
        "acceptance": st.acceptance_length,
        "ms_round": st.decode_s / rounds * 1e3,
        "draft_ms": st.draft_s / rounds * 1e3,
        "verify_ms": st.verify_s / rounds * 1e3,
        "host_ms": st.host_s / rounds * 1e3,
        "prefill_s": st.prefill_s,
        "verify_floor_ms": floors.verify_ms(ctx),
        "draft_floor_ms": floors.draft_ms(ctx) if gen.spec else 0.0,
        "simulated": st.simulated_acceptance is not None,
        "device_used_gib": (total - free) / 2**30,
        "tokens": tokens,  # taken out before the row is written
    }
    row["round_floor_ms"] = row["verify_floor_ms"] + row["draft_floor_ms"]
    row["verify_vs_floor"] = row["verify_ms"] / row["verify_floor_ms"]
    row["draft_vs_floor"] = row["draft_ms"] / row["draft_floor_ms"] if gen.spec else None
    row["round_vs_floor"] = row["ms_round"] / row["round_floor_ms"]
    row["round_vs_copy_floor"] = row["round_vs_floor"] / floors.copy_factor
    return row


def hf_peer(target_dir: Path, ctx: int, new: int, compiled: bool) -> dict:
    """transformers generate, greedy, static cache; decode tok/s = (new - 1) / (t(new) - t(1))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt_ids(ctx, model.config.vocab_size)], device="cuda")

    def gen(n: int) -> float:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        kw["disable_compile"] = not compiled
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(new)  # warm-up (and compilation)
    t1, tn = gen(1), gen(new)
    return {"tok_s": (new - 1) / (tn - t1), "ms_round": (tn - t1) / (new - 1) * 1e3, "prefill_s": t1}


def compile_peer(work: Path, ctx: int, new: int, k: int, vocab: int, max_seq: int) -> dict:
    """etspec's eager model (same Triton attention kernel), target-only decode via torch.compile."""
    from etspec.models.checkpoint import load_speculator
    from etspec.models.layers import ALL_KERNELS

    spec = load_speculator(
        work / "ckpt" / "target",
        work / "ckpt" / "draft",
        max_seq,
        k,
        torch.bfloat16,
        kernels=ALL_KERNELS,
        device="cuda",
    )
    step = torch.compile(spec.target_verify, dynamic=True)
    prompt = torch.tensor([prompt_ids(ctx, vocab)], device="cuda")
    pos = torch.arange(max_seq, device="cuda")
    win = torch.zeros(max_seq, dtype=torch.int8, device="cuda")

    def decode(n: int) -> float:
        with torch.no_grad():
            for s in range(0, ctx, CHUNK):
                e = min(s + CHUNK, ctx)
                tok, _ = spec.prefill(prompt[:, s:e], pos[s:e], win[:e])
            tok = tok.view(1, 1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n):
                ids, _ = step(tok, pos[ctx + i : ctx + i + 1], win[: ctx + i + 1])
                tok = ids[:, :1]
            tok.cpu()
            return time.perf_counter() - t0

    decode(4)  # compile
    dt = decode(new)
    return {"tok_s": new / dt, "ms_round": dt / new * 1e3}


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5))
    runs_of: dict[str, set] = {}
    for r in rows:
        runs_of.setdefault(r["impl"], set()).add(r.get("run", 0))

    def label(r: dict) -> str:  # an implementation measured in several merged runs: one series each
        return r["impl"] + (f" [run {r['run']}]" if len(runs_of[r["impl"]]) > 1 else "")

    a1.set_prop_cycle(color=plt.cm.tab20.colors)
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(label(r), []).append((r["ctx"], r["tok_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("context (tokens)")
    a1.set_ylabel("decode tok/s")
    a1.legend(fontsize=6, loc="center right")
    a1.set_title("decode tok/s vs context (speculative rows: SIMULATED acceptance)")
    ours = [r for r in rows if r["impl"].startswith("etspec") and "graph" in r["impl"]]
    labels = [f"{label(r).replace('etspec ', '')}\n{r['ctx'] // 1024}K" for r in ours]
    x = range(len(ours))
    bottom = [0.0] * len(ours)
    for key, color in (("verify_ms", "C0"), ("draft_ms", "C1"), ("host_ms", "C2")):
        vals = [r[key] for r in ours]
        a2.bar(x, vals, bottom=bottom, color=color, label=key.replace("_ms", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    a2.scatter(x, [r["round_floor_ms"] for r in ours], color="k", marker="_", s=200, label="bandwidth floor")
    a2.set_xticks(list(x), labels, fontsize=6, rotation=90)
    a2.set_ylabel("ms per round")
    a2.legend(fontsize=7)
    a2.set_title("round time (CUDA graphs) vs floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(res: dict, rows: list[dict], base: Path, png: bool = False) -> None:
    """JSON (everything, with each etspec row's ratio to every peer at its context), CSV, PNG."""
    for o in rows:
        if o["impl"].startswith("etspec"):
            o["vs_peer"] = {
                r["impl"]: o["tok_s"] / r["tok_s"]
                for r in rows
                if r["ctx"] == o["ctx"] and not r["impl"].startswith("etspec")
            }
    (base.parent / f"{base.name}.json").write_text(json.dumps({**res, "rows": rows}, indent=1))
    keys = ["impl", "ctx", "k", "tok_s", "ms_round", "verify_ms", "draft_ms", "host_ms", "round_floor_ms"]
    keys += ["round_vs_floor", "round_vs_copy_floor", "verify_vs_floor", "draft_vs_floor"]
    keys += ["speedup_vs_target_only", "prefill_s", "device_used_gib"]
    keys += ["simulated", "lossless", "run"]
    with open(base.parent / f"{base.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if png:
        plot(rows, base.parent / f"{base.name}.png")


def merge_previous(old: dict, res: dict) -> tuple[list[dict], list[dict]]:
    """An earlier results file's runs and rows (each row naming its run); `res` takes its ks/exports."""
    runs = old.get("runs") or [{key: old.get(key) for key in RUN_KEYS}]
    if any(run.get("read_gbs") is None for run in runs):
        raise SystemExit("--merge: the earlier results took copy bandwidth for their floors; run without it")
    res["ks"] = sorted(set(old["ks"]) | set(res["ks"]))
    res["export"] = {**old["export"], **{str(k): v for k, v in res["export"].items()}}
    return runs, [{**r, "run": r.get("run", 0)} for r in old["rows"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument(
        "--phase",
        default="all",
        choices=["ckpt", "export", "run", "all"],
        help="ckpt: write the random checkpoint; export: also export each k; run: also measure (all = run)",
    )
    ap.add_argument("--contexts", default="1024,16384,32768")
    ap.add_argument(
        "--max-seq",
        type=int,
        default=MAX_SEQ,
        help="the programs' max_seq_len (default %(default)s); another value gets its own --work default",
    )
    ap.add_argument("--ks", default="3,5,7", help="draft lengths, one export each")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--lossless",
        action="store_true",
        help="also run each k with the program's own draft (nothing simulated) and check that its tokens "
        "equal target-only's at every context (exit status 1 if not)",
    )
    ap.add_argument("--peers", default="hf,hf-compile,compile", help="comma list, or 'none'")
    ap.add_argument("--work", type=Path, default=None, help="checkpoint + artifact cache (out/e2e_<shape>)")
    ap.add_argument(
        "--export-args",
        default="",
        help="more etspec-export flags, e.g. '--no-reduction-kernels' (give such exports their own --work)",
    )
    ap.add_argument("--tag", default="", help="added to the results file name: e2e_<shape>_<tag>_<gpu>")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing results file that this run does not measure (each row "
        "names its run: command, device ceilings); for filling in a matrix across device calls",
    )
    ap.add_argument(
        "--measured-acceptance",
        type=Path,
        help="a bench_acceptance.py results file: each k also runs at that pair's measured acceptance "
        "on each prompt set (still through the simulator: these weights are random), labelled as such",
    )
    args = ap.parse_args()
    ks = sorted(int(x) for x in args.ks.split(","))
    measured: dict[int, list[tuple[float, str]]] = {}
    if args.measured_acceptance:
        found = json.loads(args.measured_acceptance.read_text())
        for set_name, per_k in found["sets"].items():
            for k, r in per_k.items():
                a = round(r["acceptance_length"], 2)
                measured.setdefault(int(k), []).append((a, f"sim at measured {set_name} acceptance {a}"))
    contexts = [int(x) for x in args.contexts.split(",")]
    suffix = "" if args.max_seq == MAX_SEQ else f"_{args.max_seq}"
    work = args.work or Path("out") / f"e2e_{args.shape}{suffix}"
    t_start = time.perf_counter()
    if args.phase == "ckpt":
        write_random_pair_once(work, args.shape)
        return 0
    arts, infos = {}, {}
    for k in ks:
        arts[k], infos[k] = export_shaped(
            work,
            args.shape,
            max_seq=args.max_seq,
            chunk=CHUNK,
            draft_len=k,
            extra_args=tuple(args.export_args.split()),
        )
        log(f"k={k}: {json.dumps(infos[k])}")
    if args.phase == "export":
        return 0

    gpu = torch.cuda.get_device_name()
    import transformers

    res: dict = {
        "device": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "shape": args.shape,
        "max_seq_len": args.max_seq,
        "ks": ks,
        "export": infos,
        "read_gbs": read_bandwidth_gbs(),
        "copy_gbs": copy_bandwidth_gbs(),
        "matmul_tflops": matmul_tflops(),
        "note": "speculative rows: benchmark-only acceptance simulator (random weights accept nothing)",
    }
    log(
        f"{gpu}: read {res['read_gbs']:.0f} GB/s, copy {res['copy_gbs']:.0f} GB/s, "
        f"bf16 matmul {res['matmul_tflops']:.0f} TFLOP/s"
    )
    rows: list[dict] = []
    peers = [] if args.peers == "none" else args.peers.split(",")
    base: dict = {}

    name = f"e2e_{args.shape}_{args.tag + '_' if args.tag else ''}{gpu.replace(' ', '_')}"
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    if args.merge and (args.out / f"{name}.json").is_file():
        runs, rows = merge_previous(json.loads((args.out / f"{name}.json").read_text()), res)
    res["runs"] = [*runs, {key: res[key] for key in RUN_KEYS}]

    def add(impl: str, ctx: int, k: int | None, row: dict) -> None:
        row = {"impl": impl, "ctx": ctx, "k": k, **row, "run": len(runs)}
        row.pop("tokens", None)
        rows.append(row)  # a row re-measured in a merge is kept twice, once per run
        log(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}))
        write(res, rows, args.out / name)  # after every row: a run cut short keeps what it measured

    failed = False
    for k in ks:
        floors = Floors(args.shape, 32000, k, res["read_gbs"], res["copy_gbs"])
        acc = PUBLISHED_ACCEPTANCE.get(k, min(k + 1, 3.5))
        with Program.load(arts[k]) as program:
            vocab = program.manifest.vocab_size
            # which kernels this export compiled in, from the artifact itself
            switches = ("midm_sdpa", "linear_rows", "reduction_kernels", "linear_chunk", "sdpa_chunk")
            infos[k]["kernels"] = {f: getattr(program.manifest, f) for f in switches}
            for ctx in contexts:
                prompt = prompt_ids(ctx, vocab)
                for graph in (False, True):
                    tag = " +graph" if graph else ""
                    kw = dict(cuda_graph=graph)
                    if k == ks[0]:  # target-only runs the same target_verify code in every export
                        base[ctx, graph] = run_etspec(
                            program, prompt, args.new_tokens, floors, spec=False, **kw
                        )
                        add(f"etspec target-only{tag}", ctx, None, base[ctx, graph])
                    for a, label in [(acc, f"sim {acc}"), *measured.get(k, [])]:
                        row = run_etspec(
                            program, prompt, args.new_tokens, floors, simulate_acceptance=a, **kw
                        )
                        row["speedup_vs_target_only"] = row["tok_s"] / base[ctx, graph]["tok_s"]
                        add(f"etspec spec k={k} ({label}){tag}", ctx, k, row)
                    if args.lossless:  # the program's own draft, nothing simulated: same tokens?
                        row = run_etspec(program, prompt, args.new_tokens, floors, **kw)
                        row["lossless"] = row["tokens"] == base[ctx, graph]["tokens"]
                        row["speedup_vs_target_only"] = row["tok_s"] / base[ctx, graph]["tok_s"]
                        add(f"etspec spec k={k} (own draft){tag}", ctx, k, row)
                        if not row["lossless"]:
                            log(f"NOT LOSSLESS: k={k} ctx={ctx}{tag} differs from target-only")
                            failed = True
    write(res, rows, args.out / name, png=True)
    torch.cuda.empty_cache()
    for peer in peers:
        for ctx in contexts:
            try:
                if peer in ("hf", "hf-compile"):
                    row = hf_peer(
                        work / "ckpt" / "target", ctx, args.new_tokens, compiled=peer == "hf-compile"
                    )
                    impl = "transformers generate static" + (" +compile" if peer == "hf-compile" else "")
                else:
                    vocab = SHAPES[args.shape]["vocab_size"]
                    row = compile_peer(work, ctx, args.new_tokens, ks[0], vocab, args.max_seq)
                    impl = "torch.compile eager loop (target-only)"
                add(impl, ctx, None, row)
                torch.cuda.empty_cache()
            except Exception as e:  # a peer that fails on the box is reported, not fatal
                traceback.print_exc()
                res.setdefault("peer_errors", []).append(f"{peer} ctx={ctx}: {type(e).__name__}: {e}"[:500])
    res["wall_s"] = res["runs"][-1]["wall_s"] = time.perf_counter() - t_start
    write(res, rows, args.out / name, png=True)
    if os.environ.get("OUT"):
        for ext in ("json", "csv", "png"):
            p = args.out / f"{name}.{ext}"
            if p.is_file():
                Path(os.environ["OUT"], p.name).write_bytes(p.read_bytes())
    head = ["impl", "ctx", "tok/s", "ms/rnd", "verify", "draft", "host", "vs floor", "run"]
    log("\n" + " ".join(f"{h:>8}" if i else f"{h:44s}" for i, h in enumerate(head)))
    for r in rows:
        vals = [r["ctx"], r["tok_s"], r["ms_round"]] + [
            r.get(x, 0.0) for x in ("verify_ms", "draft_ms", "host_ms")
        ]
        cells = [f"{v:>8.2f}" if isinstance(v, float) else f"{v:>8}" for v in vals]
        vf = "-" if r.get("round_vs_floor") is None else f"{r['round_vs_floor']:.2f}"
        log(f"{r['impl']:44s} " + " ".join(cells) + f" {vf:>8} {r['run']:>8}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
