"""Run under `accelerate launch --cpu --num_processes 2`: trains a tiny model through qlora.train.train and records,
per rank, which rows its dataloader serves and the loss it computes, so test_distributed.py can check the sharding,
the loss averaging and that only rank 0 writes. Not a test module itself (no test_ prefix)."""
import json
import sys
from pathlib import Path

import qlora.train as qtrain
from qlora.config import TrainConfig

cfg_path, out = Path(sys.argv[1]), Path(sys.argv[2])
original_build = qtrain.build_trainer


def build_and_record(*args, **kwargs):
    trainer = original_build(*args, **kwargs)
    rank = trainer.args.process_index
    # the rows this rank's (accelerate-sharded) dataloader serves in one epoch
    rows = [ids for batch in trainer.get_train_dataloader() for ids in batch["input_ids"].tolist()]
    (out / f"rows-{rank}.json").write_text(json.dumps(rows))
    compute_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        value = (loss[0] if isinstance(loss, tuple) else loss).item()
        with open(out / f"loss-{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.state.global_step + 1, "loss": value}) + "\n")
        return loss

    trainer.compute_loss = recording_loss
    return trainer


qtrain.build_trainer = build_and_record
events = []
run_dir = qtrain.train(TrainConfig.from_yaml(cfg_path), events.append)
from accelerate import PartialState  # noqa: E402

rank = PartialState().process_index
(out / f"events-{rank}.json").write_text(json.dumps([type(e).__name__ for e in events]))
(out / f"run_dir-{rank}.txt").write_text(str(run_dir))
