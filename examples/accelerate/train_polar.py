"""PoLAR fine-tuning under DDP or FSDP2, launched with ``torchrun`` or ``accelerate launch``; with ``--check``
it also verifies the distributed landing step (used by ``benchmarks/gpu_check_distributed.sh``).

    torchrun --nproc_per_node 2 examples/accelerate/train_polar.py --parallel fsdp2 --check
    torchrun --nproc_per_node 2 examples/accelerate/train_polar.py --parallel ddp
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/train_polar.py --parallel accelerate
    accelerate launch --config_file examples/accelerate/ddp.yaml   examples/accelerate/train_polar.py --parallel accelerate

The model is a small Llama built from a config (no download) trained on random tokens; swap in
``AutoModelForCausalLM.from_pretrained(...)`` and a real data loader for actual work. The order that matters:

* plain torch: ``get_peft_model`` → ``fully_shard`` / ``DDP`` → ``polar.make_optimizer`` (shard first, then build
  the optimiser, so it holds the sharded DTensor parameters);
* accelerate: ``get_peft_model`` → ``polar.make_optimizer`` → ``accelerator.prepare(model, optimizer)``
  (accelerate shards and swaps the parameters inside the optimiser's existing param groups; PoLAR's roles are
  group options and survive).

Saving: ``polar.distributed.save_adapter(model, out_dir)`` on *every* rank (gathers the adapter only, writes on
rank 0, fails loudly on a wrong shape).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def build_base(hidden: int, layers: int, vocab: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # identical base weights on every rank and when reloading
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def build_model(hidden: int, layers: int, r: int):
    import peft

    import polar

    base = build_base(hidden, layers)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    return peft.get_peft_model(base, polar.PolarConfig(r=r, alpha=2 * r, target_modules=targets, landing_lambda=0.5))


def batch(step: int, rank: int, micro: int, length: int, vocab: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (micro, length), generator=gen).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", choices=["ddp", "fsdp2", "accelerate", "none"], default="fsdp2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--polar-r", type=int, default=16, help="PoLAR rank r")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--out", default="runs/polar_multi_gpu")
    ap.add_argument("--check", action="store_true", help="verify the sharded landing step and the saved adapter")
    args = ap.parse_args()

    from polar.distributed import comm_stats, is_dtensor, reset_comm_stats, save_adapter
    from polar.optim import make_optimizer

    if args.check:  # exact fp32 matmuls for the comparisons
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    accelerator = None
    if args.parallel == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator()
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1 or args.parallel != "none":
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)

    model = build_model(args.hidden, args.layers, args.polar_r).to(device)
    vocab = model.config.vocab_size
    if accelerator is not None:
        opt = make_optimizer(model, lr=args.lr)  # accelerate: optimiser first, prepare() swaps its parameters
        model, opt = accelerator.prepare(model, opt)
        inner_opt = opt.optimizer
    else:
        if args.parallel == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        elif args.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = make_optimizer(model.module if args.parallel == "ddp" else model, lr=args.lr)  # after sharding
        inner_opt = opt

    stiefel = [p for g in inner_opt.param_groups if g["polar_role"] == "stiefel" for p in g["params"]]
    sharded = any(is_dtensor(p) for p in stiefel)
    if rank == 0:
        print(f"[polar] parallel={args.parallel} world={world} device={device} sharded_factors={sharded} "
              f"factors={len(stiefel)}", flush=True)
    if args.check and args.parallel == "fsdp2":
        assert sharded, "FSDP2 run but the optimiser holds no DTensor factors (optimiser built before sharding?)"
    if args.check:
        roles = [g["polar_role"] for g in inner_opt.param_groups]
        assert roles.count("stiefel") >= 2 and "theta" in roles, roles

    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = batch(step, rank, args.micro_batch, args.length, vocab, device)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        if args.check and step == 1 and sharded:  # step 0: Θ = 0, so G = 0 and the field is rounding noise
            _check_field(inner_opt, stiefel, rank)
        reset_comm_stats()
        opt.step()
        stats = comm_stats()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            orth = inner_opt.orthogonality_report()
            print(f"[polar] step {step} loss {loss.item():.4f} orth_max {orth['max']:.2e} "
                  f"all_reduce {stats['all_reduce_calls']} calls / {stats['all_reduce_elements']} floats", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if rank == 0:
        print(f"[polar] {args.steps} steps in {time.perf_counter() - t0:.2f} s", flush=True)

    to_save = accelerator.unwrap_model(model) if accelerator is not None else model
    save_adapter(to_save, args.out)
    if args.check:
        # fp32 end to end: the reloaded model must agree to 1e-3; with accelerate's bf16 mixed precision the
        # distributed forward runs in bf16, so only a coarse agreement is expected.
        mixed = accelerator is not None and accelerator.mixed_precision != "no"
        _check_saved(to_save, args, device, rank, tol=1e-1 if mixed else 1e-3)
    if rank == 0:
        print("[polar] CHECK OK" if args.check else f"[polar] adapter saved to {args.out}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def _check_field(opt, stiefel, rank: int) -> None:
    """The optimiser's sharded field equals the dense field of the gathered factor (test-only gathering)."""
    from polar.distributed import comm_stats, like_param, reset_comm_stats
    from polar.optim.executors import Workspace, prepare
    from polar.optim.landing import landing_field

    X = [p.detach().full_tensor() for p in stiefel]
    G = [p.grad.full_tensor() for p in stiefel]
    lam = opt.param_groups[0]["landing_lambda"]
    reset_comm_stats()
    buckets = opt.buckets()  # the part of step() before AdamW: Grams and the field, per bucket
    for bucket in buckets:
        prepare(bucket, Workspace())
    stats = comm_stats()
    fed = {id(p): like_param(f, p) for b in buckets for p, f in zip(b.params, b.fed)}
    worst = 0.0
    for p, x, g in zip(stiefel, X, G):
        dense = landing_field(x, g, lam)
        worst = max(worst, float((fed[id(p)].full_tensor() - dense).abs().max() / dense.abs().max().clamp_min(1e-6)))
    if rank == 0:
        print(f"[polar] sharded vs dense landing field: max rel. error {worst:.2e}; "
              f"{stats['all_reduce_calls']} all-reduces, {stats['all_reduce_elements']} floats, "
              f"{stats['all_gather_calls']} gathers", flush=True)
    assert worst < 1e-4, worst
    assert stats["all_gather_calls"] == 0


@torch.no_grad()
def _check_saved(model, args, device, rank: int, tol: float) -> None:
    """The saved adapter, loaded into an unsharded model on rank 0, reproduces the distributed model's logits."""
    from peft import PeftModel

    ids = batch(10_000, 0, 2, 32, 1024, device)
    model.eval()
    want = model(input_ids=ids).logits  # a collective under FSDP2: all ranks run it
    if rank == 0:
        base = build_base(args.hidden, args.layers).to(device)
        loaded = PeftModel.from_pretrained(base, args.out).to(device).eval()
        got = loaded(input_ids=ids).logits
        err = float((got - want).abs().max())
        print(f"[polar] reloaded adapter: max |logit difference| {err:.2e}", flush=True)
        assert err < tol, err
        merged = loaded.merge_and_unload()(input_ids=ids).logits
        assert float((merged - want).abs().max()) < 10 * tol


if __name__ == "__main__":
    main()
