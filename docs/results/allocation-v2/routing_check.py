"""CPU checks of the MoE balancing behind the 10x runs' routing figures (README, Compute, calls 11-14).

``moe-top3``'s worst MoE layer sent nearly every token to one expert for most of its 6,000 GPU steps, which the
balancing bias should not allow. Two checks that the mechanism itself works, on the CPU, written into ``--out``:

- ``small-run.jsonl``: the ``metrics.jsonl`` of a small model with ``moe-top3``'s MoE shape (16 experts, 1 shared,
  top 3; width 128, 3 MoE layers) trained for ``--steps`` steps of 8 x 128 tokens, eager: each layer's max/mean load
  and most loaded expert every 25 steps; ``small-run.png`` draws the loads;
- ``compiled.json`` (with ``--compiled``): the tiny preset trained 5 steps eagerly and 5 compiled from the same seed,
  and whether every MoE layer's balancing bias ended identical (compilation takes minutes on a CPU).

The runs' checkpoints and weights go to a temporary folder, removed at the end. Prints the loads every 100 steps.

    python docs/results/allocation-v2/routing_check.py --out DIR [--data runs/corpus-english] [--steps 1500] \
        [--compiled]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from engram.model.config import EngramLMConfig, MoEConfig
from engram.train.compare import read_metrics
from engram.train.optim import OptimConfig
from engram.train.sweep_report import finish_plot, pyplot
from engram.train.trainer import METRICS_FILE, Trainer, TrainConfig

MOE_TOP3 = MoEConfig(num_experts=16, num_shared_experts=1, top_k=3, expert_dim=64)


def train(data: str, tokenizer: str, out: Path, steps: int, model: EngramLMConfig, compile: bool, batch: int,
          seq: int) -> Trainer:
    """Train ``model`` on ``data`` into ``out``, logging every 25 steps (and the last), no evaluation."""
    cfg = TrainConfig(preset="tiny", data=[data], tokenizer=tokenizer, out=str(out), max_steps=steps, batch_size=batch,
                      seq_len=seq, eval_every=10**9, eval_batches=1, log_every=min(25, steps), save_every=10**9,
                      progress=False, tensorboard=False, optim=OptimConfig(warmup_steps=min(50, steps)),
                      model=model, compile=compile)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def plot_loads(rows: list[dict], out_file: Path) -> Path:
    """Each MoE layer's max/mean load against the step, with the ceiling num_experts / top_k."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    steps = [row["step"] for row in rows]
    for layer in range(len(rows[0]["moe_load_by_layer"])):
        ax.plot(steps, [row["moe_load_by_layer"][layer] for row in rows], lw=1.2, label=f"MoE layer {layer}")
    ax.axhline(MOE_TOP3.num_experts / MOE_TOP3.top_k, color="black", lw=0.8, ls="--",
               label="ceiling: every token sends one pick to one expert")
    ax.set_xlabel("step")
    ax.set_ylabel("most loaded expert / even split")
    ax.set_title("16 experts, top 3: the balancing bias at work (CPU, eager)")
    return finish_plot(fig, [ax], out_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where small-run.jsonl, .png, compiled.json go")
    parser.add_argument("--data", default="runs/corpus-english", help="a prepared corpus or text files")
    parser.add_argument("--tokenizer", default="bpe-8192", help="the corpus's tokenizer")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compiled", action="store_true", help="also compare 5 compiled steps with 5 eager ones")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())  # the runs' checkpoints and weights: not results
    model = EngramLMConfig.from_preset("tiny", d_model=128, n_layers=4, engram=None, moe=MOE_TOP3)
    train(args.data, args.tokenizer, work / "small-run", args.steps, model, False, args.batch, args.seq)
    shutil.copy(work / "small-run" / METRICS_FILE, args.out / "small-run.jsonl")
    rows = read_metrics(work / "small-run")
    plot_loads(rows, args.out / "small-run.png")
    for row in rows:
        if row["step"] % 100 == 0 or row is rows[0] or row is rows[-1]:
            print(row["step"], f"loss {row['loss']:.2f}", "load", [round(v, 2) for v in row["moe_load_by_layer"]],
                  "hot expert", row["moe_hot_expert_by_layer"])
    if args.compiled:
        tiny = EngramLMConfig.from_preset("tiny", d_model=32, n_layers=2, ffn_kinds=["dense", "moe"])
        biases = {}
        for compiled in (False, True):
            trainer = train(args.data, args.tokenizer, work / f"tiny-{'compiled' if compiled else 'eager'}", 5,
                            tiny, compiled, 4, 32)
            biases[compiled] = [moe.expert_bias.tolist() for moe in trainer.model.moe_layers]
        report = {"eager": biases[False], "compiled": biases[True], "identical": biases[False] == biases[True]}
        (args.out / "compiled.json").write_text(json.dumps(report, indent=1) + "\n")
        print("compiled and eager balancing biases identical:", report["identical"])
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
