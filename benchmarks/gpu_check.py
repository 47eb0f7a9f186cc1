"""The GPU check: training throughput (accelerate launch) and serving on one offline GPU box, in one go.

A borrowed GPU box reaches no package index and is lent for minutes, so the check is prepared here
and carried over whole (`scripts/gpu/prepare.sh`, then `scripts/gpu/check.sh` there):

    prepare  (here, with .venv)  wheels the GPU image lacks, the SmolLM2 tokenizer and config, and
                                 BFCL data rendered by the wire format, into one ignored folder (.gpu/)
    run      (there)             random-init models of real architectures (Qwen2.5-0.5B, SmolLM2-135M)
                                 trained through `accelerate launch -m fcdistill.train` (tokens/s, MFU),
                                 then served by `fcd serve` (hf engine, bf16) at 1/8/32 concurrent
                                 requests, grammar on and off; every constrained answer is checked
                                 to be a complete, schema-valid call

`run --cpu-dry-run` does the same steps at toy size on CPU (the test suite runs it, so the script
cannot rot). Results go to OUT/gpu_check.json, rewritten after every step, so a run stopped by its
time limit still returns what it measured; each step's log lands beside it.

MFU counts model FLOPs the usual way (6N plus attention: forward, weight gradients and input
gradients) over the GPU's dense bf16 peak. LoRA computes no gradients for frozen weights, so the
work actually done is about 2/3 of that; both figures are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What fcdistill needs that the GPU image lacks; their dependencies follow, except the packages below.
CARRY_ROOTS = ["trl", "datasets", "outlines", "outlines-core", "fastapi", "uvicorn", "openai", "tenacity",
               "jsonschema", "pydantic", "prometheus-client"]
# The image's own ML stack (and large wheels): never shadowed by a carried copy.
IMAGE_KEEPS = {"torch", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "pyarrow",
               "pandas", "peft", "accelerate", "jinja2", "markupsafe", "pyyaml", "filelock", "fsspec", "packaging",
               "psutil", "tqdm", "requests", "urllib3", "certifi", "charset-normalizer", "pillow", "regex", "xxhash",
               "python-dateutil", "pytz", "tzdata", "six", "aiohttp", "numba", "triton", "sympy", "networkx"}
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]
CARRY_LIMIT_MB = 48  # of the 64 MiB a device call carries; the rest is the working tree
TRAIN_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                   "generation_config.json", "special_tokens_map.json"]

QWEN05_ARCH = dict(  # Qwen2.5-0.5B's config.json: a random init needs no download
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_dropout=0.0, initializer_range=0.02, use_sliding_window=False)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# -- prepare (here) --------------------------------------------------------------------------------
def carry_closure(roots: list[str], keep: set[str]) -> dict[str, str]:
    """name -> installed version for `roots` and their dependencies (as Python 3.12 on Linux resolves
    their markers), read from this environment's metadata, minus the packages the image keeps."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in found or name in keep:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"prepare: {name} is not installed here; run scripts/setup.sh first") from None
        found[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return dict(sorted(found.items()))


def download_wheels(pins: dict[str, str], dest: Path) -> list[str]:
    """cp312 manylinux wheels of exactly these versions, no dependencies (the closure is explicit)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run(cmd + [f"{n}=={v}" for n, v in pins.items()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prepare: pip download failed:\n{proc.stderr[-3000:]}")
    return sorted(p.name for p in dest.glob("*.whl"))


def prepare(out: Path, *, wheels: bool, serve_items: int) -> dict[str, Any]:
    """Everything the check needs that the repository does not hold, into `out` (an ignored folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fcdistill.data.bfcl import SplitOptions, prepare_bfcl, read_records
    from fcdistill.data.export import export_split
    from fcdistill.models import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if wheels:
        pins = carry_closure(CARRY_ROOTS, IMAGE_KEEPS)
        manifest["wheels"] = download_wheels(pins, out / "wheels")
        manifest["pins"] = pins
    model_dir = Path(resolve_model("smollm2-135m"))
    tok_dir = out / "smollm2"
    tok_dir.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tok_dir / name)
    data = out / "bfcl"
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(out / "bfcl-root"))
    prepare_bfcl(SplitOptions(categories=TRAIN_CATEGORIES, eval_fraction=0.5, mix_in_fraction=0.5, seed=0), data)
    train_path, n_train, _ = export_split(data, "train", "trl", out / "train.trl.jsonl", labels="ground-truth")
    items = [r for r in read_records(data, "eval") if r.category == "simple_python"][:serve_items]
    (out / "serve_items.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in items), encoding="utf-8")
    shutil.rmtree(data)
    shutil.rmtree(out / "bfcl-root", ignore_errors=True)
    manifest.update({"train_pairs": n_train, "serve_items": len(items)})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest["size_mb"] = round(size / 2**20, 2)
    if size > CARRY_LIMIT_MB * 2**20:
        raise SystemExit(f"prepare: {out} holds {size / 2**20:.1f} MiB, over the {CARRY_LIMIT_MB} MiB a device call can carry")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# -- run (there) -----------------------------------------------------------------------------------
class Results:
    """OUT/gpu_check.json, rewritten after every step so that a stopped run keeps what it measured."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.data: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def step(self, name: str, fn: Any, *args: Any, need_s: float = 0, **kwargs: Any) -> Any:
        """Run one step, record its result or error and its time; skip it when too little time is left."""
        if self.left() < need_s:
            self.data["steps"][name] = {"skipped": f"{self.left():.0f}s left of the budget, needs ~{need_s:.0f}s"}
            self.save()
            return None
        print(f"[gpu-check] {name} ({self.left():.0f}s left)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            value = fn(*args, **kwargs)
            rec = {"ok": True, **(value if isinstance(value, dict) else {})}
        except Exception as exc:  # one failed step is a finding; the others still run
            value, rec = None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
        rec["seconds"] = round(time.monotonic() - t0, 1)
        self.data["steps"][name] = rec
        self.save()
        print(f"[gpu-check] {name}: {json.dumps(rec)[:600]}", file=sys.stderr, flush=True)
        return value

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.data["load_average"] = os.getloadavg()
        path = self.out / "gpu_check.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.data, indent=2) + "\n")
        path.with_suffix(".tmp").replace(path)


def environment(dry: bool) -> dict[str, Any]:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "outlines-core", "outlines",
                "fastapi", "uvicorn", "openai", "pydantic", "pyarrow", "numpy", "huggingface-hub"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "cpus": os.cpu_count(),
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        info["matmul_bf16_tflops"] = _matmul_tflops(torch)
    elif not dry:
        raise RuntimeError("no CUDA device (use --cpu-dry-run on a CPU machine)")
    return info


def _matmul_tflops(torch: Any, n: int = 8192, reps: int = 10) -> float:
    """The bf16 matrix-product rate this GPU reaches in practice: the ceiling beside the datasheet's."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 1)


def make_models(carry: Path, work: Path, dry: bool, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Random-init models of the real architectures, saved with SmolLM2's tokenizer (its ids fit both)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dry else torch.bfloat16
    smol = json.loads((carry / "smollm2" / "config.json").read_text())
    specs = {"qwen2.5-0.5b-arch": dict(QWEN05_ARCH), "smollm2-135m-arch": smol}
    specs = {k: v for k, v in specs.items() if not only or k in only}
    tokenizer = AutoTokenizer.from_pretrained(str(carry / "smollm2"))
    made = {}
    for name, cfg in specs.items():
        if dry:
            cfg = {**cfg, **TOY}
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        target = work / "models" / name
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        made[name] = {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}
        del model
    return made


def flops_per_token(config: Any, context: float) -> dict[str, float]:
    """TRL's training FLOPs per token (3x forward: 2 x matmul weights, lm_head included, plus PaLM's
    non-causal attention over `context` tokens), split into forward and the LoRA work (2x forward)."""
    from trl.trainer.utils import compute_flops_per_token

    train = compute_flops_per_token(config, round(context))
    return {"forward": train / 3, "model_6n": train, "lora_work": train * 2 / 3}


def _token_context(tokenizer_dir: Path, data: Path, max_length: int) -> tuple[float, int]:
    """Token-weighted mean example length (the attention context each token sees) and example count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = [n for n in (len(ids) for ids in tok([r["prompt"] + r["completion"] for r in rows])["input_ids"])
               if n <= max_length]
    return sum(n * n for n in lengths) / sum(lengths), len(lengths)


def train_variant(carry: Path, work: Path, out: Path, model: str, variant: str, sets: list[str], dry: bool,
                  steps: int, timeout_s: float) -> dict[str, Any]:
    """`accelerate launch -m fcdistill.train` on the shipped GPU config, timed from its train_log.jsonl."""
    from transformers import AutoConfig

    run_dir = work / "train" / f"{model}-{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"student={work / 'models' / model}", f"data.train={carry / 'train.trl.jsonl'}", "data.eval_fraction=0",
                 "data.drop_overlength=true", f"output_dir={run_dir}", f"max_steps={steps}", "logging_steps=1",
                 "save_steps=100000", "eval_steps=null", "tensorboard=false", "optim.warmup_ratio=0", *sets]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "single_gpu.yaml")]
    if dry:
        launch += ["--cpu", "--mixed_precision", "no"]
        overrides += ["precision=fp32", "optim.optimizer=adamw_torch"]
    cmd = [*launch, "-m", "fcdistill.train", "--config", str(ROOT / "configs" / "train" / "qwen2.5-0.5b-gpu.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    log = out / f"train-{model}-{variant}.log"
    t0 = time.monotonic()
    with log.open("w") as handle:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}; log {log.name}: {log.read_text(errors='replace')[-1500:]}")
    events = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [e for e in events if "loss" in e and "num_tokens" in e]
    skip = 2 if len(steps_logged) > 4 else 1  # warm-up steps (allocation, kernel selection) are not timed
    first, last = steps_logged[skip - 1], steps_logged[-1]
    seconds = last["time"] - first["time"]
    tokens = last["num_tokens"] - first["num_tokens"]
    info = json.loads((run_dir / "run_info.json").read_text())
    tps = tokens / seconds if seconds > 0 else float("nan")
    config = AutoConfig.from_pretrained(str(work / "models" / model))
    max_length = int(next((s.split("=", 1)[1] for s in sets if s.startswith("max_length=")), 2048))
    context, examples = _token_context(work / "models" / model, carry / "train.trl.jsonl", max_length)
    flops = flops_per_token(config, context)
    result = {"model": model, "command": "accelerate launch --config_file configs/accelerate/single_gpu.yaml -m fcdistill.train "
                         "--config configs/train/qwen2.5-0.5b-gpu.yaml " + " ".join(f"--set {s}" for s in sets),
              "steps": last["step"], "steps_timed": last["step"] - first["step"], "tokens_timed": int(tokens),
              "seconds_timed": round(seconds, 2), "train_tokens_per_second": round(tps, 1),
              "wall_seconds_with_load": round(wall, 1), "final_loss": last["loss"], "examples": examples,
              "mean_token_context": round(context, 1), "flops_per_token_6n": round(flops["model_6n"]),
              "precision": info.get("precision"), "packing": info.get("packing"), "device": info.get("device"),
              "trainable_parameters": info.get("trainable_parameters"),
              "peak_gpu_memory_gb": max((e["peak_gpu_memory_gb"] for e in events if "peak_gpu_memory_gb" in e),
                                        default=None)}
    from trl.trainer.utils import get_peak_flops

    peak = None if dry else get_peak_flops(os.environ.get("FCD_GPU_NAME", ""), "bfloat16")
    if peak:
        result["peak_bf16_tflops"] = round(peak / 1e12, 1)
        result["mfu"] = round(tps * flops["model_6n"] / peak, 4)
        result["mfu_lora_work"] = round(tps * flops["lora_work"] / peak, 4)
    profiled = run_dir / "profile" / "ops.json"
    if profiled.is_file():  # `profile.*` in sets: the operator table travels back beside the results
        shutil.copy(run_dir / "profile" / "ops.txt", out / f"profile-{model}-{variant}.txt")
        shutil.copy(profiled, out / f"profile-{model}-{variant}.json")
        ops = json.loads(profiled.read_text())
        result["profile"] = {k: ops[k] for k in ("steps", "wall_seconds_per_step", "device_seconds_per_step")}
        result["profile"]["top_ops"] = ops["ops"][:8]
        result["timed_with_profiler"] = True  # the recorded steps are inside the timed ones: slower than a plain run
    return result


def serve_model(carry: Path, work: Path, out: Path, model: str, dry: bool, max_tokens: int,
                concurrency: list[int]) -> dict[str, Any]:
    """`fcd serve` (hf engine) on the random model: tokens/s free vs constrained, and call validity."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_bench import stack_speed

    from fcdistill.data.bfcl import Record
    from fcdistill.serve.process import start_server

    items = [Record.model_validate_json(line) for line in (carry / "serve_items.jsonl").read_text().splitlines() if line]
    requests = {c: (2 if dry else max(8, 2 * c)) for c in concurrency}
    t0 = time.monotonic()
    server = start_server(["--model", str(work / "models" / model), "--max-batch", str(max(concurrency))],
                          out / f"serve-{model}.log", timeout=600)
    startup = time.monotonic() - t0
    try:
        import openai

        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=600, max_retries=0)
        result = asyncio.run(stack_speed(client, str(work / "models" / model), items, max_tokens, requests,
                                         tuple(concurrency)))
    finally:
        server.stop()
    return {"startup_seconds": round(startup, 1), "max_tokens": max_tokens, **result}


def run(carry: Path, out: Path, *, dry: bool, budget_s: float, profile: bool = False) -> dict[str, Any]:
    """Every step of the check, each timed and recorded; returns the results. `profile`: instead, the
    Qwen2.5-0.5B architecture's two training variants under torch.profiler, then its serving."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      PYTHONUNBUFFERED="1")
    if not (carry / "train.trl.jsonl").is_file():
        raise SystemExit(f"{carry} holds no prepared data: run scripts/gpu/prepare.sh first")
    res = Results(out, budget_s)
    res.data.update({"mode": ("cpu-dry-run" if dry else "gpu") + ("-profile" if profile else ""), "budget_s": budget_s})
    env = res.step("environment", environment, dry)
    if env is None:
        return res.data
    os.environ["FCD_GPU_NAME"] = env.get("gpu", "")
    work = Path(os.environ.get("FCD_GPU_WORK", "/tmp/fcd-gpu-check")) if not dry else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    qwen = "qwen2.5-0.5b-arch"
    if res.step("models", make_models, carry, work, dry, (qwen,) if profile else ()) is None:
        return res.data
    steps = 4 if dry else (12 if profile else 40)
    train_timeout = 300 if dry else 240
    # unpacked: rows padded per batch, batches grouped by length; shipped: the config as it is (packed
    # rows of 2048 tokens, batch 8, which TRL flattens into one 16,384-token row)
    batch, length = (2, 1024) if dry else (32, 2048)
    unpacked = [f"batch_size={batch}", "grad_accum=1", "packing=false", "sampling=group_by_length",
                f"max_length={length}"]
    variants = [(qwen, f"unpacked-b{batch}", unpacked), ("smollm2-135m-arch", f"unpacked-b{batch}", unpacked)]
    # the dry run records the packed variant's last steps too, so the --profile path is exercised by the tests
    variants.append((qwen, "shipped-packed", ["batch_size=1", "profile.start_step=3", "profile.steps=2"] if dry else []))
    if profile:
        recorded = [] if dry else ["profile.start_step=6", "profile.steps=3"]
        variants = [(m, v, [*sets, *recorded]) for m, v, sets in variants if m == qwen]
    for model, variant, sets in variants:
        res.step(f"train {model} {variant}", train_variant, carry, work, out, model, variant, sets, dry, steps,
                 train_timeout, need_s=60 if dry else 75)
    for model in ((qwen,) if profile else ("smollm2-135m-arch", qwen)):
        res.step(f"serve {model}", serve_model, carry, work, out, model, dry, 48 if dry else 64,
                 [1, 2] if dry else [1, 8, 32], need_s=30 if dry else 100)
    return res.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="gather what the GPU box lacks into an ignored folder (run here)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--no-wheels", action="store_true", help="skip the wheels (enough for --cpu-dry-run)")
    p.add_argument("--serve-items", type=int, default=32)
    r = sub.add_parser("run", help="run the check (on the GPU box; --cpu-dry-run here)")
    r.add_argument("--carry", type=Path, default=ROOT / ".gpu")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--cpu-dry-run", action="store_true")
    r.add_argument("--budget-s", type=float, default=450, help="stop starting new steps after this many seconds")
    r.add_argument("--profile", action="store_true",
                   help="only the Qwen2.5-0.5B architecture: its training variants under torch.profiler, then serving")
    args = parser.parse_args()
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.out, wheels=not args.no_wheels, serve_items=args.serve_items), indent=2))
        return
    data = run(args.carry, args.out, dry=args.cpu_dry_run, budget_s=args.budget_s, profile=args.profile)
    failed = [k for k, v in data["steps"].items() if not v.get("ok", False)]
    print(json.dumps(data, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
