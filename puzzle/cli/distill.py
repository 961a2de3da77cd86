"""`puzzle distill`: global knowledge distillation (GKD) of a child against the parent."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="global knowledge distillation (GKD) of a realized child against the parent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train the whole child against the parent on the tokens' GKD split. Loss: sum over layers of\n"
            "(1 - cos(h_child, h_parent)) + KL(parent || child) on next-token distributions; no LM loss by\n"
            "default (it hurt in the paper). AdamW, linear warm-up then cosine decay, gradient clipping,\n"
            "bf16 autocast on CUDA. The parent's outputs are computed on the fly.\n\n"
            "Resume: checkpoints are kept every --checkpoint-every steps in the output's staging directory;\n"
            "after a crash or kill, run the same command again and training continues from the last one and\n"
            "ends after the same number of steps.\n\n"
            "Several GPUs (data-parallel, DDP; --batch-size is the global batch):\n"
            "  torchrun --nproc-per-node 8 --no-python puzzle distill CHILD --parent P --tokens T --out O ...\n"
            "Several nodes: add --nnodes N --node-rank R --rdzv-endpoint HOST:PORT; rank 0 writes the output."
        ),
    )
    p.add_argument("child", help="the realized child artifact")
    p.add_argument("--parent", required=True, help="the parent as an all-parent child artifact")
    p.add_argument("--tokens", required=True, help="tokens artifact (with a 'gkd' split unless --split)")
    p.add_argument(
        "--out", required=True, help="output child artifact: local directory or s3://bucket/prefix"
    )
    p.add_argument(
        "--token-budget", type=int, required=True, help="training tokens (steps = budget / (batch x seq_len))"
    )
    p.add_argument("--batch-size", type=int, default=8, help="global batch in sequences (default 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument(
        "--warmup-fraction", type=float, default=0.05, help="share of steps for linear warm-up (default 0.05)"
    )
    p.add_argument(
        "--weight-cosine", type=float, default=1.0, help="weight of the per-layer cosine loss (default 1)"
    )
    p.add_argument("--weight-kl", type=float, default=1.0, help="weight of KL(parent||child) (default 1)")
    p.add_argument("--weight-lm", type=float, default=0.0, help="weight of the LM loss (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation seed (default 0)")
    p.add_argument("--split", default="gkd", help="training split of the tokens artifact (default gkd)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.child.gkd import distill, init_distributed

    manifest = distill(
        args.child,
        args.parent,
        args.tokens,
        args.out,
        token_budget=args.token_budget,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_fraction=args.warmup_fraction,
        weight_cosine=args.weight_cosine,
        weight_kl=args.weight_kl,
        weight_lm=args.weight_lm,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        grad_checkpointing=args.grad_checkpointing,
        split=args.split,
        device=args.device,
    )
    if init_distributed().is_main:
        s = manifest.summary
        rate = f", {s['tokens_per_s']:.0f} tokens/s" if s.get("tokens_per_s") else ""
        print(
            f"distilled child written to {args.out}: {s['steps']} steps, {s['tokens']:,} tokens, "
            f"loss {s['first_loss']} -> {s['final_loss']}{rate}"
        )
    return 0
