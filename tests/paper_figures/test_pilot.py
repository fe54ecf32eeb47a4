"""paper_figures.pilot: a pilot's table comes from its logs (sizes, stop reasons, best epoch)."""

from __future__ import annotations

import json

from paper_figures.pilot import pilot_table


def _log(path, name, tokens, rule, valids, final=True, lr=3e-4):
    cfg = {"arch": "gpt2", "optimizer": "adam", "train_tokens": tokens, "emb": 128, "layers": 2, "heads": 4, "lr": lr, "rule": rule,
           "q_embedding": 0.3, "q_attention": 0.1, "q_residual": 0.2, "seed": 1}
    lines = [{"type": "header", "run_name": name, "config_name": "t", "config": cfg}]
    for i, v in enumerate(valids, 1):
        lines.append({"type": "eval", "step": 10 * i, "epoch": float(i), "valid_ppl": v,
                      "clean_train_ppl": 100.0 + i, "wall_time": 60.0 * i})
    if final:
        lines.append({"type": "final", "step": 10 * len(valids), "best_valid_ppl": min(valids),
                      "stop": "patience", "wall_time": 60.0 * len(valids)})
    path.joinpath(name + ".jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_rows_give_size_best_epoch_and_how_the_run_ended(tmp_path):
    _log(tmp_path, "big-none", 200_000, "none", [300.0, 250.0, 260.0])
    _log(tmp_path, "small-dropout", 40_000, "dropout", [500.0, 450.0], final=False)
    table = pilot_table(tmp_path)
    lines = table.splitlines()
    assert lines[2].startswith("| 1x | 200,000 | adam 0.0003 | GPT-2 emb 128, 2 layers, 4 heads | `big-none` | - | 250.00 | 2 | 102.0 "
                               "| patience | 3 |")
    assert lines[3].startswith("| 0.2x | 40,000 |")
    assert "| emb 0.3, attn 0.1, resid 0.2 | 450.00 | 2 |" in lines[3]
    assert lines[3].endswith("| stopped by hand at epoch 2 | 2 |")
    assert lines[-1] == "2 runs, 5 training minutes in all."
