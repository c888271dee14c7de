"""What every recipe needs around its training loop: processes, seeds, checkpoints, progress.

The loop the four recipes run (recipes/*.py `main`):

    args = parse_recipe_args(recipe_parser(__doc__, DEMO, REAL, out="runs/x", eval_items="test images"), argv, DEMO, REAL)  # unet_seg.cli
    run = start_run(args, demo="tiny random models, synthetic scenes", real="--model <SD 2.x> --data-root ...")
    with same_init_on_every_rank(args.seed):                  # the same initial weights on every rank,
        sd = demo.tiny_sd() if args.demo else load_sd(args.model)
        model = ...                                           # then each rank its own noise from (seed, rank)
    opt, sched = ..., ...                                     # rank, world, device: run.rank, ...
    models = {"head": model}                                   # what training changes
    step = resume_latest(args.out, models, optimizer=opt, scheduler=sched, steps=args.steps) if args.resume else 0
    forward = wrap_for_training(model, compile=args.compile)   # DDP with several processes, then compile
    loader = resumable_loader(dataset, args.batch_size, args.seed, num_workers=args.workers)
    sanity_check(args, out=args.out, step=step, loader=loader, train=..., models=models, evaluate=..., targets=...)
    bar = progress(total=args.steps, initial=step)
    for step, epoch, batch in training_batches(loader, step, args.steps):
        with autocast(run.device):
            loss = check_finite_everywhere(loss_fn(forward(batch["image"]), batch["label"]), "loss")
        ...; bar.update()
        if should_checkpoint(step, args.save_every, args.steps):  # and at the step Ctrl-C / SIGTERM came
            save_checkpoint(args.out, step, models, optimizer=opt, scheduler=sched, epoch=epoch, extra={"steps": args.steps}, keep_last=2)
    conf, shown = evaluate_semantic(predict, test_data, ...)   # each rank its `rank_share`
    return finish_run(run, {"mIoU": miou}, out=args.out, title="...")  # table, times, barrier, cleanup

Collectives (`save_checkpoint`, `check_finite_everywhere`, `barrier`) must be called by every
rank; only rank 0 writes files. A checkpoint stores what training changes: frozen parameters
(requires_grad False) only as a fingerprint, which --resume checks against the ones rebuilt from
--model. Checkpoints are safetensors only: tensors as tensors, everything
else (optimizer hyper-parameters, scheduler state, counters, every rank's RNG states) as JSON in
the header. Resuming is exact (bit for bit on the same hardware and world size, each rank its own
stream back) when the data order comes from `resumable_loader` and the loss draws randomness
only from the global RNGs restored here.

One job per module; import everything from `unet_seg.train`:

    distributed   init_distributed, rank_and_world, rank_share, head, is_main, barrier, print0,
                  print_demo, unwrap, cleanup_distributed, exit_gloo_process, check_finite_everywhere
    rng           same_init_on_every_rank, seed_everything, rank_seed, rng_states, set_rng_states
    loop          resumable_loader (ResumableSampler), training_batches, should_checkpoint,
                  interrupted (Ctrl-C / SIGTERM)
    checkpoints   save_checkpoint, load_checkpoint, resume_latest, load_latest, latest_checkpoint,
                  checkpoint_path, frozen_weights, FrozenWeightsDiffer
    compute       autocast, maybe_compile, compile_cache_dir, wrap_for_training, ddp, evaluation
    step          backward_and_step, clip_and_step (no host sync), CudaGraphStep (a whole step as one CUDA graph), CudaGraphCall (the same for inference), use_cuda_graph (a recipe's --cuda-graph)
    report        progress (LineProgress), write_metrics
    run           start_run, finish_run
    sanity        sanity_check (a real run's first minutes: steps, checkpoint, one item per eval set)
"""

from ..files import atomic_path
from .checkpoints import (
    CHECKPOINT_FORMAT, FrozenWeightsDiffer, Resumed, checkpoint_path, frozen_weights, latest_checkpoint, load_checkpoint, load_latest,
    resume_latest, save_checkpoint,
)
from .compute import autocast, compile_cache_dir, ddp, evaluation, maybe_compile, wrap_for_training
from .distributed import (
    barrier, check_finite_everywhere, cleanup_distributed, exit_gloo_process, head, init_distributed, is_main, print0,
    print_demo, rank_and_world, rank_share, unwrap,
)
from .loop import ResumableSampler, interrupted, resumable_loader, should_checkpoint, training_batches
from .report import LineProgress, PathLike, progress, write_metrics
from .rng import rank_seed, rng_states, same_init_on_every_rank, seed_everything, set_rng_states
from .run import Run, finish_run, start_run
from .sanity import SanityReport, sanity_check
from .step import CudaGraphCall, CudaGraphStep, backward_and_step, clip_and_step, use_cuda_graph

__all__ = [
    "CHECKPOINT_FORMAT", "FrozenWeightsDiffer", "Resumed", "checkpoint_path", "frozen_weights", "latest_checkpoint", "load_checkpoint",
    "load_latest", "resume_latest", "save_checkpoint",
    "autocast", "compile_cache_dir", "ddp", "evaluation", "maybe_compile", "wrap_for_training",
    "barrier", "check_finite_everywhere", "cleanup_distributed", "exit_gloo_process", "head", "init_distributed", "is_main", "print0",
    "print_demo", "rank_and_world", "rank_share", "unwrap",
    "ResumableSampler", "interrupted", "resumable_loader", "should_checkpoint", "training_batches",
    "rank_seed", "rng_states", "same_init_on_every_rank", "seed_everything", "set_rng_states",
    "LineProgress", "PathLike", "progress", "write_metrics",
    "Run", "finish_run", "start_run",
    "SanityReport", "sanity_check",
    "CudaGraphCall", "CudaGraphStep", "backward_and_step", "clip_and_step", "use_cuda_graph",
    "atomic_path",  # unet_seg.files', also importable from here
]  # fmt: skip
