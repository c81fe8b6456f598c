"""The GPU check, in one run: what the CUDA path must show, and its decode speed beside transformers.

Run by bench/gpu.sh on a machine with a CUDA GPU (it installs the carried wheels first); with
--dry-run, every part runs on this CPU on a tiny model instead (model.device auto -> CPU), so
that the device's minutes go to the device. Parts, in order, each timed and recorded:

1. a random checkpoint of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads,
   vocabulary 128,256, bfloat16), with the demo model's tokenizer; --dry-run: a tiny one;
2. pytest tests/test_engine_cuda.py (logits parity with transformers in float32 and bfloat16,
   the KV cache leaving the largest step room, CUDA graphs against eager steps);
3. the engine alone: decode tokens/s at batch 1, 16, 64 and 256 (128-token prompts, 128 new
   tokens each), as the worker runs it (decode graphs on CUDA);
4. transformers' generate on the same weights at batch 1 and 64;
5. the whole daemon on the checkpoint (model.device auto): decode tokens/s end to end over HTTP,
   the same batches as concurrent streams;
6. a blue-green reload to a copy of the checkpoint, both models on the one device (the room
   check against torch.cuda.mem_get_info), and rule model.tp-exceeds-gpus against the real
   device count.

Figures go to OUT/gpu.json (and the card's name with them).

    bash bench/gpu.sh                         # on the device: OUT is where figures go
    python bench/gpu.py --dry-run --out /tmp/gpu-dry   # here, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import BIN, REPO, RunFrame, clean_env

BATCHES = (1, 16, 64, 256)
PROMPT_TOKENS, NEW_TOKENS = 128, 128
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,  # the demo tokenizer's: its ids must be the model's
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def build_checkpoint(target: Path, shape: dict, tokenizer_from: Path, device: str) -> Path:
    """A random Llama checkpoint of `shape`, bfloat16, with a tokenizer (the demo model's)."""
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, torch_dtype="bfloat16"))
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, target / name)
    return target


def engine_decode(model_dir: Path, batch: int, device: str) -> dict:
    """The engine alone, as the worker runs it: tokens/s of NEW_TOKENS decode steps of `batch`."""
    import torch
    from harness.models import Sequences

    from daemon.config.schema import DaemonSettings
    from daemon.worker.service import load_runner

    settings = DaemonSettings(
        model={"path": str(model_dir), "device": device},
        scheduler={"max_running_requests": max(BATCHES), "max_total_tokens": batch * 512 + 4096},
    )
    runner, _loaded = load_runner(settings)
    seqs = Sequences(runner)
    prompts = {seq: [(seq * 31 + i) % 500 + 1 for i in range(PROMPT_TOKENS)] for seq in range(batch)}
    last = runner.step([seqs.chunk(seq, p, 0) for seq, p in prompts.items()])
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for step in range(NEW_TOKENS):
        last = runner.step([seqs.chunk(seq, [last[seq]], PROMPT_TOKENS + step) for seq in prompts])
    sync()
    seconds = time.perf_counter() - started
    graphs = runner.graphs.captured if runner.graphs is not None else []
    return {"batch": batch, "tok_s": round(batch * NEW_TOKENS / seconds, 1), "graphs": len(graphs)}


def transformers_generate(model_dir: Path, batch: int, device: str) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(1, 500, (batch, PROMPT_TOKENS), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        sync()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        sync()
    return {"batch": batch, "tok_s": round(batch * NEW_TOKENS / (time.perf_counter() - started), 1)}


async def http_decode(url: str, batch: int) -> dict:
    """`batch` concurrent streams of NEW_TOKENS tokens each through the daemon: tokens/s."""
    body = {"model": "gpu", "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0}
    limits = httpx.Limits(max_connections=batch + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(index: int) -> int:
            prompt = " ".join(f"w{(index * 7 + i) % 400}" for i in range(PROMPT_TOKENS))
            answer = await client.post("/v1/completions", json={**body, "prompt": prompt})
            answer.raise_for_status()
            return answer.json()["usage"]["completion_tokens"]

        await one(0)  # the first request's shapes (and graphs) off the clock
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(batch))))
    return {"batch": batch, "tok_s": round(tokens / (time.perf_counter() - started), 1)}


def reload_blue_green(frame: RunFrame, model_dir: Path, copy: Path, settings: dict) -> dict:
    """The daemon on `model_dir` in blue_green mode, its file then pointed at `copy` and reloaded:
    the new worker loads beside the old one, on the one device. The reload's report."""
    config = frame.work / "blue-green.toml"

    def write(path: Path) -> None:
        config.write_text(
            f'[model]\npath = "{path}"\nserved_model_name = "gpu"\n'
            '[runtime]\nmodel_reload = "blue_green"\nwatch_config = false\n'
        )

    write(model_dir)
    daemon = frame.start_demo_daemon(settings, name="blue-green", config=config)
    try:
        write(copy)
        result = subprocess.run(
            [str(BIN / "daemon"), "reload", "--runtime-dir", str(frame.runtime_dir), "--format", "json"],
            capture_output=True,
            text=True,
            timeout=600,
            env=clean_env(),
        )
        report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else result.stdout
        return {"exit": result.returncode, "report": report}
    finally:
        frame.stop(daemon)


def tp_rule(device_count: int) -> dict:
    result = subprocess.run(
        [str(BIN / "daemon"), "check", "-c", str(REPO / "configs" / "server.toml"), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(DAEMON_MODEL__DEVICE="cuda", DAEMON_MODEL__TP_SIZE=str(device_count + 1)),
    )
    rules = [e["rule"] for e in json.loads(result.stdout)["errors"]]
    return {"devices": device_count, "tp_size": device_count + 1, "refused": "model.tp-exceeds-gpus" in rules}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where gpu.json goes")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, on whatever device is here")
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(REPO / "tests"))  # the harness's block bookkeeping drives the engine
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    figures: dict = {"card": torch.cuda.get_device_name(0) if cuda else "none (CPU)", "dry_run": args.dry_run}
    args.out.mkdir(parents=True, exist_ok=True)
    frame = RunFrame("gpu-", total_time_limit=540)
    started = time.monotonic()

    def part(name: str, value: object) -> None:
        figures[name] = value
        figures.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)
        (args.out / "gpu.json").write_text(json.dumps(figures, indent=2))
        print(f"{name}: {json.dumps(value)}", flush=True)

    with frame.guarded():
        shape = TINY if args.dry_run else LLAMA_1B
        checkpoint = build_checkpoint(frame.work / "llama-1b", shape, frame.demo_model(), device)
        part("checkpoint", {"shape": shape, "dir": str(checkpoint)})
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", "0", "tests/test_engine_cuda.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        part("tests", {"exit": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:]})
        batches = BATCHES[:2] if args.dry_run else BATCHES
        part("engine", [engine_decode(checkpoint, b, device) for b in batches])
        part("transformers", [transformers_generate(checkpoint, b, device) for b in (1, 64)[: len(batches)]])
        served = {
            "model.path": checkpoint,
            "model.device": "auto",
            "model.served_model_name": "gpu",
            "scheduler.max_running_requests": max(BATCHES),
            "scheduler.max_total_tokens": 65536 if not args.dry_run else 8192,
        }
        daemon = frame.start_demo_daemon(served, name="daemon")
        part("http", [asyncio.run(http_decode(daemon.url, b)) for b in batches])
        frame.stop(daemon)
        copy = shutil.copytree(checkpoint, frame.work / "llama-1b-copy")
        limits = {k: v for k, v in served.items() if k.startswith("scheduler.")}
        part("blue_green", reload_blue_green(frame, checkpoint, copy, {"model.device": "auto", **limits}))
        part("tp_rule", tp_rule(torch.cuda.device_count()) if cuda else "skipped: no CUDA device")
    return frame.exit_code


if __name__ == "__main__":
    sys.exit(main())
