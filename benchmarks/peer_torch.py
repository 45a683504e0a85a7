"""Our training step against PyTorch + PEFT on the same machine, each configuration in its own
process, every footprint sampled from outside.

The peer is what an NVIDIA user would otherwise run: a Llama built by transformers from the same
architecture (random weights, nothing downloaded), PEFT's LoRA on the same modules of the same
layers with float32 adapters, AdamW, clipping at 1.0, sdpa attention, eager or `torch.compile`,
gradient checkpointing on or off. Ours is the sweep's own trial (your_ai/trial.py) at the same
batch, rank, layers and sequence length. A sampler in this process reads each configuration's
process from outside (NVML on CUDA, the resident set on the CPU); each process also reports its
allocator's peak (MLX's counter, `torch.cuda.max_memory_allocated`) and its CPU time per step,
which says whether the host keeps the GPU waiting. The bf16 matmul rate is measured through both
frameworks in their own processes, and MFU is over the better of them.

    python benchmarks/peer_torch.py --out DIR [--parts ours-ckpt,torch-compile-ckpt,...]
        [--arch hidden_size=64 ...] [--batch 4 --seq 1024 --rank 128 --lora-layers 24]
        [--extra OVERRIDE ...] [--budget-s 540] [--torch-python PYTHON] [--output FILE]

Parts (CONFIGS below): matmul-{mlx,torch}; ours-{ckpt,plain}; ours-chunked-{ckpt,plain}
(training.loss_chunk_tokens=1024); ours-input-{ckpt,plain} (lora.compute_dtype=input);
ours-step-{ckpt,plain} (memory.limit_gb=step: the step's own need); ours-q4-ckpt and
ours-q4-dequant-ckpt (4-bit base, MLX's quantized matmul or training.quantized_matmul=dequantize,
what `auto` picks on CUDA, under the default memory limit); ours-q4-dequant-unlimited-ckpt (the
latter under MLX's own memory limit, memory.limit_gb=null); torch-{eager,compile}-{ckpt,plain};
memory-{ckpt,plain} (benchmarks/memory_parts.py). Results go to DIR/peer_torch.json after each
part, the table to DIR/BENCHMARKS-peer.md; a part that fails or does not fit in --budget-s is a row
saying so.

The default shape is the 8B Llama 3.1 architecture (conf/model/llama-3.1-8b.yaml) in bf16;
`--arch` overrides any of its keys, so the script runs on a CPU at a tiny shape. PyTorch,
transformers and PEFT are this script's own needs (`--torch-python` names an interpreter that
has them); nothing of theirs is imported by the package.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = "RESULT "  # a child's last line: RESULT {json}

# Every configuration this script knows: the side, checkpointing, compiling (PyTorch) and our
# extra overrides. Names are what --parts takes.
CONFIGS: dict[str, dict] = {
    "matmul-mlx": {"side": "matmul-mlx"},
    "matmul-torch": {"side": "matmul-torch"},
    "ours-ckpt": {"side": "ours", "checkpoint": True},
    "ours-plain": {"side": "ours", "checkpoint": False},
    "ours-chunked-ckpt": {
        "side": "ours",
        "checkpoint": True,
        "overrides": ["training.loss_chunk_tokens=1024"],
    },
    "ours-chunked-plain": {
        "side": "ours",
        "checkpoint": False,
        "overrides": ["training.loss_chunk_tokens=1024"],
    },
    "ours-input-ckpt": {
        "side": "ours",
        "checkpoint": True,
        "overrides": ["lora.compute_dtype=input"],
    },
    "ours-input-plain": {
        "side": "ours",
        "checkpoint": False,
        "overrides": ["lora.compute_dtype=input"],
    },
    "ours-q4-ckpt": {
        "side": "ours",
        "checkpoint": True,
        "overrides": ["model.quantize={bits:4,group_size:64}", "training.quantized_matmul=native"],
    },
    "ours-q4-dequant-ckpt": {
        "side": "ours",
        "checkpoint": True,
        "overrides": [
            "model.quantize={bits:4,group_size:64}",
            "training.quantized_matmul=dequantize",
        ],
    },
    # The same under MLX's own memory limit, not the step's need (the default on CUDA).
    "ours-q4-dequant-unlimited-ckpt": {
        "side": "ours",
        "checkpoint": True,
        "overrides": [
            "model.quantize={bits:4,group_size:64}",
            "training.quantized_matmul=dequantize",
            "memory.limit_gb=null",
        ],
    },
    # The bf16 step under its own need as MLX's memory limit: less memory, some speed.
    "ours-step-ckpt": {"side": "ours", "checkpoint": True, "overrides": ["memory.limit_gb=step"]},
    "ours-step-plain": {
        "side": "ours",
        "checkpoint": False,
        "overrides": ["memory.limit_gb=step"],
    },
    # Where our step's memory goes (benchmarks/memory_parts.py), the loss chunked at 1024 too.
    "memory-ckpt": {"side": "memory", "checkpoint": True},
    "memory-plain": {"side": "memory", "checkpoint": False},
    "torch-eager-ckpt": {"side": "torch", "checkpoint": True, "compile": False},
    "torch-eager-plain": {"side": "torch", "checkpoint": False, "compile": False},
    "torch-compile-ckpt": {"side": "torch", "checkpoint": True, "compile": True},
    "torch-compile-plain": {"side": "torch", "checkpoint": False, "compile": True},
}
# The comparison and the targets first, so a run cut short by --budget-s still has them.
DEFAULT_PARTS = (
    "matmul-mlx,matmul-torch,ours-ckpt,torch-compile-ckpt,ours-plain,torch-compile-plain,"
    "ours-q4-ckpt,ours-q4-dequant-ckpt,torch-eager-ckpt,torch-eager-plain,ours-chunked-plain,"
    "memory-plain"
)

LORA_KEYS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --- the shape ---------------------------------------------------------------------------------


def default_architecture() -> dict:
    """conf/model/llama-3.1-8b.yaml's architecture, read without Hydra (the PyTorch side's
    interpreter need not have it)."""
    import yaml

    text = (ROOT / "conf" / "model" / "llama-3.1-8b.yaml").read_text()
    return dict(yaml.safe_load(text)["architecture"])


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def layer_matrix_parameters(arch: dict) -> int:
    """A decoder layer's attention and MLP matrices (its norms left out)."""
    hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or hidden // heads
    return hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * arch["intermediate_size"]


def parameter_count(arch: dict) -> int:
    """The Llama's parameters: embeddings, attention, MLP and norms of every layer, the head."""
    hidden, vocab = arch["hidden_size"], arch["vocab_size"]
    layer = layer_matrix_parameters(arch) + 2 * hidden
    head = 0 if arch.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + arch["num_hidden_layers"] * layer + hidden + head


def element_bytes(dtype: str) -> int:
    """Bytes per weight in `dtype` (float32, or a 16-bit type)."""
    return 4 if dtype == "float32" else 2


def largest_layer_bytes(arch: dict, dtype: str) -> int:
    """The largest layer's weights in `dtype`: a decoder layer's or the output head's."""
    largest = max(layer_matrix_parameters(arch), arch["vocab_size"] * arch["hidden_size"])
    return largest * element_bytes(dtype)


def q4_bound(bf16: dict, q4: dict, layer_bytes: int) -> int:
    """What a 4-bit step may hold: the bf16 step's footprint with its weights swapped for the
    4-bit ones, plus the largest layer dequantized (the output head at a large vocabulary)."""
    return bf16["outside_peak_bytes"] - bf16["weight_bytes"] + q4["weight_bytes"] + layer_bytes


def step_flops(n_params: float, layers: int, lora_layers: int, tokens: int, ckpt: bool) -> float:
    """benchmarks/gpu.py's count: a forward pass over all parameters, a backward pass over the
    LoRA layers' share of them (activation gradients), one more forward of them with
    checkpointing."""
    backward = 2 * n_params * (lora_layers / layers) * tokens
    return 2 * n_params * tokens + backward + (backward if ckpt else 0.0)


# --- the children -------------------------------------------------------------------------------


def matmul_torch(size: int, repeats: int = 20) -> float:
    """bf16 size^3 through PyTorch, one product per synchronisation (as gpu.py's MLX rate)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        tick = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - tick)
    return 2 * size**3 / statistics.median(times[3:]) / 1e12


def torch_step(spec: dict) -> dict:
    """The PEFT step: build, adapt, then `warmup + steps` optimizer steps, the median timed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"])
    arch = spec["architecture"]
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "head_dim",
    )
    config = LlamaConfig(
        **{k: arch[k] for k in keys if arch.get(k) is not None},
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(0)
    tick = time.perf_counter()
    # Built in its dtype on the device: no float32 copy of the weights ever exists.
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        base = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    layers = arch["num_hidden_layers"]
    lora = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=LORA_KEYS,
        layers_to_transform=list(range(layers - spec["lora_layers"], layers)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (PEFT's default) keeps the adapters in float32 on a bf16 base.
    model = get_peft_model(base, lora, autocast_adapter_dtype=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable), "adapters are not float32"
    if spec["checkpoint"]:
        # Every decoder layer, as ours; transformers 5 renamed the call (the old name warns).
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    load_s = time.perf_counter() - tick
    forward = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.AdamW(
        trainable,
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        **({"fused": True} if dev == "cuda" else {}),
    )
    generator = torch.Generator().manual_seed(0)
    shape = (spec["batch"], spec["seq"])
    tokens = torch.randint(0, arch["vocab_size"], shape, generator=generator).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the weights stay resident, so they count
    times, losses, cpu_marks = [], [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        sync()
        tick = time.perf_counter()
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, as our step's mx.eval does
        sync()
        times.append(time.perf_counter() - tick)
        cpu_marks.append(time.process_time())
    allocated = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if dev == "cuda" else None
    return {
        "step_s": statistics.median(times[spec["warmup"] :]),
        "first_step_s": times[0],
        "load_s": load_s,
        "allocator_peak_bytes": allocated,
        "reserved_peak_bytes": reserved,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": sum(p.numel() for p in trainable),
        "framework": f"torch {torch.__version__}",
        "cpu_s": timed_cpu(cpu_marks, spec["warmup"]),
    }


def our_overrides(spec: dict) -> list[str]:
    arch = [f"model.architecture.{k}={v}" for k, v in spec["architecture"].items()]
    return [
        "model=llama-3.1-8b",
        "model.random_weights=true",
        f"model.dtype={spec['dtype']}",
        *arch,
        f"training.max_seq_length={spec['seq']}",
        f"training.grad_checkpoint={spec['checkpoint']}",
        f"lora.alpha={spec['alpha']}",
        f"sweep.steps={spec['warmup'] + spec['steps']}",
        f"sweep.warmup_steps={spec['warmup']}",
        "sweep.early_stop=false",
        *spec.get("overrides", []),
        *spec["extra"],
    ]


def our_step(spec: dict) -> dict:
    """The sweep's trial, set up as a worker sets itself up."""
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import footprint, preload, record

    idle_gpu_bytes = footprint.gpu_used_bytes() if preload.cuda_build_installed() else None
    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=our_overrides(spec))
    import mlx.core as mx

    from your_ai import device, models, trial

    os.environ.update(preload.mlx_env(cfg, device.backend()))
    device.apply_memory_settings(device.memory_settings(cfg))
    tick = time.perf_counter()
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    load_s = time.perf_counter() - tick
    params = {
        "training.batch_size": spec["batch"],
        "lora.rank": spec["rank"],
        "lora.num_layers": spec["lora_layers"],
    }
    meter = footprint.meter(device.backend(), idle_gpu_bytes)
    cpu_marks: list[float] = []  # the process's CPU time at the end of each step
    result = trial.measure(
        loaded,
        cfg,
        params,
        record.Limits(float("inf"), 0.0),
        meter,
        lambda _step: cpu_marks.append(time.process_time()),
    )
    meter.close()
    if result.state != "complete":
        raise RuntimeError(f"our step did not complete: {result.state} {result.reason}")
    return {
        "step_s": result.step_time_s,
        "first_step_s": result.first_step_s,
        "load_s": load_s,
        "allocator_peak_bytes": result.mlx_peak_bytes,
        "inside_footprint_bytes": result.peak_bytes,
        "weight_bytes": loaded.weight_bytes,
        "loss_first": result.loss_first,
        "loss_last": result.loss_last,
        "trainable_params": result.trainable_params,
        "framework": f"mlx {mx.__version__}",
        "cpu_s": timed_cpu(cpu_marks, spec["warmup"]),
        # cuda_graphs as this process ran (on the CPU there are none).
        "cuda_graphs": {"1": "on", "0": "off"}.get(os.environ.get(preload.GRAPHS_ENV), "-"),
    }


def timed_cpu(marks: list[float], warmup: int) -> float:
    """The median CPU time of the timed steps, from the process's CPU time at each step's end:
    set beside the step's wall time, it says whether the host keeps the GPU waiting."""
    spent = [after - before for before, after in itertools.pairwise(marks)]
    return statistics.median(spent[max(warmup - 1, 0) :])


def child(name: str, spec: dict) -> dict:
    side = CONFIGS[name]["side"]
    if side == "matmul-mlx":
        from benchmarks.gpu import matmul_tflops

        return {"tflops": matmul_tflops(spec["matmul_size"])}
    if side == "matmul-torch":
        return {"tflops": matmul_torch(spec["matmul_size"])}
    if side == "torch":
        return torch_step(spec)
    if side == "memory":
        from benchmarks.memory_parts import breakdown

        params = [
            f"training.batch_size={spec['batch']}",
            f"lora.rank={spec['rank']}",
            f"lora.num_layers={spec['lora_layers']}",
        ]
        return {"memory": breakdown([*our_overrides(spec), *params], 1024)}
    return our_step(spec)


# --- this process --------------------------------------------------------------------------------


def run_child(name: str, spec: dict, args, out: Path, gpu, timeout: float) -> dict:
    """One configuration in a fresh process, sampled from outside; its result or its error."""
    from benchmarks.footprint import OutsideSampler

    side = CONFIGS[name]["side"]
    torch_side = side in ("torch", "matmul-torch")
    python = args.torch_python if torch_side else sys.executable
    # The checkout first, then what the caller's PYTHONPATH names (a --target install of MLX).
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    if not torch_side:
        from your_ai import preload

        # OpenBLAS and tcmalloc on the Linux CPU, as the sweep's workers have them.
        env.update(preload.preload_env("auto"))
    argv = [python, __file__, "--child", name, "--spec", json.dumps(spec)]
    log = out / f"{name}.log"
    idle = gpu.used_bytes() if gpu is not None else None
    tick = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = OutsideSampler(proc.pid, gpu, idle, args.interval_ms / 1e3)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    outside = sampler.stop()
    wall = time.perf_counter() - tick
    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT)]
    if rc != 0 or not lines:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        reason = f"killed after {timeout:.0f} s" if wall >= timeout else f"exit {rc}"
        return {"name": name, "error": f"{reason}: {tail[0][:300]}", "wall_s": wall}
    return {
        "name": name,
        **CONFIGS[name],
        **json.loads(lines[-1][len(RESULT) :]),
        "outside_peak_bytes": outside["peak_bytes"],
        "outside_samples": outside["samples"],
        "wall_s": wall,
    }


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.3f}"


def summarise(results: dict, spec: dict) -> str:
    from benchmarks.common import table

    tokens = spec["batch"] * spec["seq"]
    arch = spec["architecture"]
    n_params = parameter_count(arch)
    rates = {n: r["tflops"] for n, r in results.items() if "tflops" in r}
    best = max(rates.values(), default=None)
    rows = []
    for name, r in results.items():
        if "tflops" in r or "memory" in r or CONFIGS[name]["side"] == "memory":
            continue
        if "error" in r:
            rows.append([name, r["error"], *["-"] * 9])
            continue
        flops = step_flops(
            n_params, arch["num_hidden_layers"], spec["lora_layers"], tokens, r["checkpoint"]
        )
        achieved = flops / r["step_s"] / 1e12
        rows.append(
            [
                name,
                f"{r['step_s']:.3f}",
                f"{tokens / r['step_s']:.0f}",
                f"{achieved:.3g}",
                f"{achieved / best:.1%}" if best else "-",
                gb(r["outside_peak_bytes"]),
                gb(r["allocator_peak_bytes"]),
                gb(r.get("reserved_peak_bytes")),
                f"{r['first_step_s']:.1f}",
                f"{r['cpu_s']:.3f}" if "cpu_s" in r else "-",
                r.get("cuda_graphs", "-"),
            ]
        )
    head = [
        "configuration",
        "s/step",
        "tok/s",
        "TFLOP/s",
        "MFU",
        "footprint GB (outside)",
        "allocator peak GB",
        "torch reserved GB",
        "first step s",
        "CPU s/step",
        "MLX CUDA graphs",
    ]
    text = (
        f"shape: {arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}, vocab "
        f"{arch['vocab_size']} ({n_params / 1e9:.3g} B parameters), {spec['dtype']}; batch "
        f"{spec['batch']} x {spec['seq']} random tokens, LoRA rank {spec['rank']} / alpha "
        f"{spec['alpha']} on q/k/v/o of the last {spec['lora_layers']} layers (float32 "
        f"adapters), AdamW, clip 1.0; median of {spec['steps']} steps after {spec['warmup']}; "
        "each configuration in its own process; CPU s/step: the process's CPU time per timed "
        "step, all its threads (a host thread kept busy all the step long shows as about the "
        "step's time); MLX CUDA graphs: `cuda_graphs` as resolved for our step.\n\n"
    )
    if rates:
        measured = ", ".join(f"{n.split('-')[1]} {v:.3g} TFLOP/s" for n, v in rates.items())
        text += (
            f"matmul bf16 {spec['matmul_size']}^3: {measured}; MFU is over the best, "
            f"{best:.3g} TFLOP/s\n\n"
        )
    if rows:  # none where only the memory parts ran
        text += table(head, rows) + "\n"
    ok = {n: r for n, r in results.items() if "step_s" in r}
    for kind in ("ckpt", "plain"):
        ours, peer = ok.get(f"ours-{kind}"), ok.get(f"torch-compile-{kind}")
        if ours and peer:
            text += (
                f"\n- checkpointing {'on' if kind == 'ckpt' else 'off'}: ours / compiled "
                f"PyTorch tokens/s {peer['step_s'] / ours['step_s']:.3f}x (target >= 1.15x), "
                f"footprint {gb(ours['outside_peak_bytes'])} vs "
                f"{gb(peer['outside_peak_bytes'])} GB (target: no more)"
            )
    for name in ("ours-q4-ckpt", "ours-q4-dequant-ckpt", "ours-q4-dequant-unlimited-ckpt"):
        if name in ok and "ours-ckpt" in ok:
            q4, bf16 = ok[name], ok["ours-ckpt"]
            layer = largest_layer_bytes(arch, spec["dtype"])
            text += (
                f"\n- {name}: {q4['step_s'] / bf16['step_s']:.2f}x the bf16 step's time "
                f"(target <= 1.5x), footprint {gb(q4['outside_peak_bytes'])} GB against "
                f"{gb(q4_bound(bf16, q4, layer))} GB (target: no more): the bf16 step's "
                f"{gb(bf16['outside_peak_bytes'])} less its weights "
                f"{gb(bf16['weight_bytes'])}, plus the 4-bit weights "
                f"{gb(q4['weight_bytes'])} and one layer dequantized {gb(layer)}"
            )
            if "ours-step-ckpt" in ok:
                # The same bound from the bf16 step under its own need as the memory limit.
                own = ok["ours-step-ckpt"]
                text += (
                    f"; against the bf16 step under memory.limit_gb=step "
                    f"({gb(own['outside_peak_bytes'])} GB): {gb(q4_bound(own, q4, layer))} GB"
                )
    for name, r in results.items():
        if "memory" in r:
            from benchmarks.memory_parts import describe

            text += f"\n\n{name}: where our step's memory goes\n\n{describe(r['memory'])}"
        elif CONFIGS[name]["side"] == "memory":
            text += f"\n\n{name}: {r.get('error')}\n"
    return text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="results directory (logs, peer_torch.json, the table)")
    parser.add_argument("--parts", default=DEFAULT_PARTS, help="configurations, in this order")
    parser.add_argument("--arch", nargs="*", default=[], help="architecture key=value overrides")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=256.0)
    parser.add_argument("--lora-layers", type=int, default=24)
    parser.add_argument("--extra", nargs="*", default=[], help="our overrides added to every "
                        "ours and memory part, e.g. cuda_ops_per_buffer=6")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--torch-python", default=sys.executable, help="an interpreter with "
                        "torch, transformers and peft")  # fmt: skip
    parser.add_argument("--interval-ms", type=float, default=10.0, help="outside sampling")
    parser.add_argument("--child-timeout", type=float, default=480.0, help="seconds per process")
    parser.add_argument("--budget-s", type=float, default=1e9, help="seconds for all of them")
    parser.add_argument("--output", help="append the table here (default: DIR/BENCHMARKS-peer.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alpha != 2 * args.rank:
        # Our trial takes alpha from the rank (your_ai/record.py), as the sweep measures it.
        parser.error(f"--alpha {args.alpha}: ours uses alpha = 2 x rank ({2 * args.rank})")
    if args.child:
        print(RESULT + json.dumps(child(args.child, json.loads(args.spec))), flush=True)
        return
    if not args.out:
        parser.error("--out is required")
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in CONFIGS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    architecture = default_architecture()
    for item in args.arch:
        key, _, value = item.partition("=")
        if key not in architecture:
            parser.error(f"--arch {item}: no key {key} in the architecture")
        architecture[key] = parse_value(value)
    spec = {
        "architecture": architecture,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": args.alpha,
        "lora_layers": args.lora_layers,
        "extra": args.extra,
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_size": args.matmul_size,
    }
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from your_ai import footprint

    try:
        gpu = footprint.Gpu()
    except Exception:  # noqa: BLE001 - no NVML: the CPU, sampled through the resident set
        gpu = None
    results: dict = {}
    started = time.perf_counter()
    for name in parts:
        # Within --budget-s, so the table is always written, with what did not fit marked.
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            results[name] = {"name": name, "error": "not run: out of --budget-s"}
            continue
        spec_i = {**spec, **CONFIGS[name]}
        results[name] = run_child(name, spec_i, args, out, gpu, min(args.child_timeout, left))
        shown = {k: v for k, v in results[name].items() if k not in ("side", "overrides")}
        print(json.dumps(shown, default=str), flush=True)
        # After each configuration, so a run cut short keeps what it measured.
        (out / "peer_torch.json").write_text(
            json.dumps({"spec": spec, "results": results}, indent=2, default=str)
        )
    from benchmarks.common import command_line, record

    machine = f"{gpu.name} (NVML)" if gpu is not None else None
    record(
        "NVIDIA: our step against PyTorch + PEFT" if gpu else "Our step against PyTorch + PEFT",
        command_line(),
        summarise(results, spec),
        where=Path(args.output) if args.output else out / "BENCHMARKS-peer.md",
        machine_line=machine,
    )


if __name__ == "__main__":
    main()
