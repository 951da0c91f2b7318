"""Pretraining a backbone (the embedded `fashion-mini`) on the fashion world, on Ray Train, as a typed job:
`PretrainJobConfig` in, ``OUT/model.safetensors`` out (`tokenfactory pretrain`: `cli/pretrain_cmd.py`).

Stage ``clip`` trains the CLIP pair, stage ``unet`` the generator on the frozen text encoder; ``all``
runs both. Every ``--checkpoint-every`` steps the trainer state (weights, optimiser, EMA, RNGs) is
reported to Ray Train (so a failed worker restarts from it) and written to ``OUT/checkpoints/STAGE.pt``;
a later run with the same ``--out`` resumes from there, so a long run can span several sittings
(``--max-minutes`` ends a sitting cleanly, checkpointed). The final weights go to
``OUT/model.safetensors`` and a metrics log to ``OUT/pretrain-STAGE.jsonl``.

On GPUs (``use_gpu``): bf16 autocast by default (``precision``), gradients averaged across workers by
one flat all-reduce per 25 MiB bucket (`factory.pretrain.average_gradients`), checkpoints read onto the
CPU whatever device wrote them. The recipe sized for one H200 is in ``docs/pretrain-gpu.md``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

from factory.storage import absolute_uri
from jobs._ray import connect

log = logging.getLogger(__name__)


def world_batches(image_size: int, partial_captions: float, group_size: int = 1):
    """A BatchFn over freshly rendered world images of train-split garments.

    A share of captions is *partial* (some attributes left out, e.g. "a red dress"): CLIP then learns
    each attribute word on its own, which is what zero-shot prompts that vary one attribute need.
    ``group_size`` > 1 draws hard-negative groups (`FashionWorld.sample`).
    """
    from factory.world import FashionWorld
    from factory.world.captions import partial_caption

    world = FashionWorld(seed=0, size=image_size, split="train")

    def batches(n, rng):
        r = world.sample(n, rng=rng, group_size=group_size)
        caps = [partial_caption(r, i, rng) if rng.random() < partial_captions else r.captions[i] for i in range(n)]
        return r.images, caps

    return batches


def read_checkpoint(data: bytes) -> dict:
    """A trainer state saved by `_run_stage`, loaded onto the CPU.

    Why ``map_location="cpu"``: a state written on a GPU worker names ``cuda:N`` for every tensor; without
    it, a resume on a CPU machine raises and a resume on GPU N+1 lands on GPU N. The trainer's
    ``load_state_dict`` then moves each tensor next to the parameter it belongs to.
    """
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def out_of_time(deadline: float, world: int, agree=None, now: float | None = None) -> bool:
    """Whether the sitting should stop now, decided the same on every worker.

    With several workers each one reads its own clock, and a worker that stopped while another took one
    more step would leave that one waiting forever in its gradient all-reduce. So the decision is taken
    at checkpoint boundaries only, and ``agree`` (a MAX all-reduce of the flag; None with one worker)
    makes it unanimous: once any worker is out of time, all stop.
    """
    late = (time.time() if now is None else now) >= deadline
    if world > 1 and agree is not None:
        return agree(late)
    return late


def check_gpus(use_gpu: bool, workers: int, cluster_gpus: float) -> None:
    """Refuse a GPU run the cluster cannot place, before Ray Train would wait for GPUs forever.

    Each worker takes one whole GPU (``ScalingConfig(use_gpu=True)``); a request for more than the
    cluster has does not fail in Ray, it waits silently.
    """
    from factory.errors import DeviceError

    if use_gpu and cluster_gpus < workers:
        raise DeviceError(
            f"--use-gpu with --workers {workers} needs {workers} GPUs, but the Ray cluster has "
            f"{cluster_gpus:g}: lower --workers, or run on a node with more GPUs"
        )


def _train_loop(config: dict) -> None:
    """Ray Train worker body: the requested stages in order, each resumable from its checkpoint."""
    import ray.train
    import torch
    import torch.distributed as dist

    from factory import storage
    from factory.backbones import create_backbone, get_backbone_config, load_backbone
    from factory.device import pick_device
    from factory.pretrain import average_gradients

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    if config["init"] and storage.exists(config["init"]):
        backbone = load_backbone(config["backbone"], weights=config["init"])
    else:
        backbone = create_backbone(get_backbone_config(config["backbone"]))
    # The current CUDA device, which Ray Train sets per worker (not a bare "cuda"), and TF32 on.
    device = pick_device(config["use_gpu"])
    backbone.to(device)

    def grad_sync(grads):
        average_gradients(grads, world, dist.all_reduce)

    def agree(flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    deadline = time.time() + 60 * config["max_minutes"] if config["max_minutes"] else float("inf")
    for stage in config["stages"]:
        if not _run_stage(backbone, stage, config, rank, grad_sync, deadline, world, agree):
            return  # out of time: the next sitting resumes here


def _load_state(trainer, stage: str, ckpt_uri: str) -> None:
    """Resume from Ray Train's checkpoint (a restarted worker) or our own file (a later sitting)."""
    import ray.train

    from factory import storage

    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            with open(os.path.join(d, "state.pt"), "rb") as f:
                state = read_checkpoint(f.read())
        if state["config"]["stage"] == stage:
            trainer.load_state_dict(state)
            return
    if storage.exists(ckpt_uri):
        trainer.load_state_dict(read_checkpoint(storage.read_bytes(ckpt_uri)))


def _run_stage(
    backbone, stage: dict, config: dict, rank: int, grad_sync, deadline: float, world: int = 1, agree=None
) -> bool:
    """Train one stage to its step count (or the deadline); True when the stage is complete."""
    import ray.train
    import torch

    from factory import storage
    from factory.backbones import save_weights
    from factory.pretrain import PretrainConfig, Pretrainer

    name, out = stage["stage"], config["out"]
    clip = name == "clip"
    cfg = PretrainConfig(
        stage=name,
        steps=stage["steps"],
        batch_size=config["batch_size"],
        lr=stage["lr"],
        towers=config["clip_towers"] if clip else "both",
        seed=config["seed"],
        precision=config["precision"],
    )
    batches = world_batches(config["image_size"], 0.3 if clip else 0.0, config["group_size"] if clip else 1)
    trainer = Pretrainer(backbone, cfg, batches, grad_sync=grad_sync, rank=rank)
    ckpt_uri = storage.join(out, "checkpoints", f"{name}.pt")
    _load_state(trainer, name, ckpt_uri)
    start_step, log_uri, t_start = trainer.step, storage.join(out, f"pretrain-{name}.jsonl"), time.time()
    if start_step:
        print(f"[pretrain {name}] resumed at step {start_step}", flush=True)
    # One worker may also stop between checkpoints (its own clock decides alone); several stop only at
    # checkpoint boundaries, agreed (`out_of_time`).
    step_deadline = deadline if world == 1 else None
    while trainer.step < cfg.steps and not out_of_time(deadline, world, agree):
        before = trainer.step
        metrics = trainer.train_steps(config["checkpoint_every"], deadline=step_deadline)
        if trainer.step == before:
            break  # the deadline came before this chunk's first step: nothing new to checkpoint
        metrics["wall_s"] = time.time() - t_start
        eta = (cfg.steps - trainer.step) / max(metrics["steps_per_s"], 1e-9)
        print(
            f"[pretrain {name}] step {trainer.step}/{cfg.steps} loss {metrics['loss']:.4f} "
            f"{metrics['steps_per_s']:.2f} steps/s eta {eta / 60:.1f} min",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                buf = io.BytesIO()
                torch.save(trainer.state_dict(), buf)
                storage.write_bytes(ckpt_uri, buf.getvalue())
                with open(os.path.join(d, "state.pt"), "wb") as f:
                    f.write(buf.getvalue())
                old = storage.read_bytes(log_uri).decode() if storage.exists(log_uri) else ""
                storage.write_bytes(log_uri, (old + json.dumps({"stage": name, **metrics}) + "\n").encode())
            ray.train.report(
                {"stage": name, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            )
    if trainer.step < cfg.steps:
        return False
    trainer.finish()
    if rank == 0 and trainer.step > start_step:  # only a sitting that trained writes the weights
        save_weights(backbone, out)
    backbone.requires_grad_(False)
    return True


@dataclass
class PretrainJobConfig:
    """The pretraining job's settings (every field is a `tokenfactory pretrain` flag). Not
    `factory.pretrain.PretrainConfig`, which is one stage's trainer settings: a job runs one or two stages."""

    out: str  # model.safetensors, checkpoints/, logs
    backbone: str = "fashion-mini"
    stage: str = "all"  # clip, unet or all (both, in order)
    init: str | None = None  # weights to start from (None: OUT/model.safetensors if it exists, else random)
    clip_steps: int = 3000
    unet_steps: int = 3000
    batch_size: int = 256
    clip_lr: float = 7e-4
    unet_lr: float = 1e-3
    clip_towers: str = "both"  # or "image": train the image tower against the frozen text tower
    group_size: int = 4  # clip stage: renders per hard-negative group
    checkpoint_every: int = 100
    max_minutes: float = 0.0  # end a sitting after about this many minutes, checkpointed (0: no limit)
    workers: int = 1
    cpus_per_worker: float | None = None  # None: all CPUs divided by workers
    use_gpu: bool = False
    precision: str | None = None  # fp32 or bf16 (autocast); None: bf16 with use_gpu, else fp32
    image_size: int = 32
    seed: int = 0

    def __post_init__(self):
        from factory.device import default_precision
        from factory.errors import ConfigError
        from factory.pretrain import PRETRAIN_PRECISIONS

        if self.group_size < 1:
            raise ConfigError(f"group_size must be at least 1, got {self.group_size}")
        if self.stage not in ("clip", "unet", "all"):
            raise ConfigError(f"stage must be clip, unet or all, got {self.stage!r}")
        if self.max_minutes < 0:
            raise ConfigError(f"max_minutes must be 0 (no limit) or more, got {self.max_minutes}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if self.precision is None:
            self.precision = default_precision(self.use_gpu)
        if self.precision not in PRETRAIN_PRECISIONS:  # before Ray starts, not in a worker
            raise ConfigError(
                f"pretraining precision must be one of {list(PRETRAIN_PRECISIONS)}, got "
                f"{self.precision!r}"
                + (" (fp16 would need loss scaling; use bf16)" if self.precision == "fp16" else "")
            )
        self.out, self.init = absolute_uri(self.out), absolute_uri(self.init)  # Ray workers run elsewhere


def pretrain(cfg: PretrainJobConfig) -> None:
    """Run the configured stages on Ray Train (resumable from ``cfg.out``'s checkpoints)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from factory import storage

    connect(dashboard=True)
    check_gpus(cfg.use_gpu, cfg.workers, ray.cluster_resources().get("GPU", 0))
    names = ["clip", "unet"] if cfg.stage == "all" else [cfg.stage]
    stages = [
        {
            "stage": n,
            "steps": cfg.clip_steps if n == "clip" else cfg.unet_steps,
            "lr": cfg.clip_lr if n == "clip" else cfg.unet_lr,
        }
        for n in names
    ]
    init = cfg.init or storage.join(cfg.out, "model.safetensors")
    cpus = cfg.cpus_per_worker or max(1.0, (os.cpu_count() or 1) / cfg.workers)
    config = dict(
        backbone=cfg.backbone,
        stages=stages,
        out=cfg.out,
        init=init,
        batch_size=cfg.batch_size,
        checkpoint_every=cfg.checkpoint_every,
        seed=cfg.seed,
        image_size=cfg.image_size,
        max_minutes=cfg.max_minutes,
        use_gpu=cfg.use_gpu,
        precision=cfg.precision,
        threads=cpus,
        clip_towers=cfg.clip_towers,
        group_size=cfg.group_size,
    )
    print("[pretrain] config:", json.dumps(config, sort_keys=True), flush=True)
    storage_path = os.path.join(cfg.out, "ray") if "://" not in cfg.out else tempfile.mkdtemp()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=f"pretrain-{cfg.backbone}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


__all__ = ["PretrainJobConfig", "check_gpus", "out_of_time", "pretrain", "read_checkpoint", "world_batches"]
