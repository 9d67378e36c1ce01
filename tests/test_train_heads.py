"""Head training: indexing, loss goes down with only the heads changing, resume == uninterrupted
(bit for bit), checkpoints are data only (a pickle never runs), a killed checkpoint write is
harmless, self-distillation, and clear errors. stories260k, tiny data.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from medusa_engine.heads_io import load_heads
from medusa_engine.training import checkpoint, cli, medusa, pipeline
from medusa_engine.training.config import TrainConfig, TrainError
from medusa_engine.training.data import (
    Example,
    TrainDataError,
    encode_dataset,
    load_records,
    record_kind,
    split_eval,
)
from medusa_engine.training.distill import DistillConfig, left_pad, self_distill

STORIES = (
    Path(__file__).resolve().parents[1] / "data" / "train" / "tinystories_train_sample_2MiB.txt"
)


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory) -> Path:
    """The first 40 TinyStories of the bundled sample, as a small .txt file."""
    docs = STORIES.read_text("utf-8").split("<|endoftext|>")[:40]
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("<|endoftext|>".join(docs))
    return path


@pytest.fixture(scope="module")
def examples(stories260k, stories_file) -> list[Example]:
    return encode_dataset(stories260k.tokenizer, load_records(str(stories_file)), max_length=64)


def cfg(**kw) -> TrainConfig:
    base = dict(num_heads=3, batch_size=4, max_length=64, precision="fp32", lr=1e-2, steps=6)
    base["checkpoint_every"] = 3
    return TrainConfig(**{**base, **kw})


def test_head_k_targets_the_token_k_plus_2_ahead():
    # generate.py: heads read the hidden state of the last kept token t; the base model's own
    # next token is x[t+1], head 0 proposes x[t+2], head k x[t+k+2].
    lengths, starts = torch.tensor([6, 4]), torch.tensor([1, 3])
    b, t = medusa.head_rows(lengths, starts, 6, k=0)
    assert list(zip(b.tolist(), t.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1)]
    b, t = medusa.head_rows(lengths, starts, 6, k=2)  # targets t+4 < length and >= start
    assert list(zip(b.tolist(), t.tolist())) == [(0, 0), (0, 1)]


@pytest.mark.parametrize("chunk", [4096, 7])  # one chunk, or many under activation checkpointing
def test_loss_matches_a_plain_reference(stories260k, examples, chunk):
    c = cfg(loss_chunk=chunk, distill_weight=0.25)
    heads = medusa.make_heads(stories260k, c)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = medusa.collate(examples[:3])
    hidden = medusa.base_hidden(stories260k, batch["ids_BT"], batch["lengths_B"])
    loss, hits, counts = medusa.MedusaLoss(heads, stories260k.lm_head.weight, c)(hidden, batch)
    b_, t_, e_ = hidden.shape
    logits_BTJV = heads(hidden.reshape(b_ * t_, e_), stories260k.lm_head).log_softmax(-1)
    logits_BTJV = logits_BTJV.view(b_, t_, c.num_heads, -1)
    base_BTV = stories260k.lm_head(hidden).log_softmax(-1)
    ref = 0.0
    for k in range(c.num_heads):
        terms = []
        for b, e in enumerate(examples[:3]):
            for t in range(len(e.ids) - k - 2):
                if t + k + 2 >= e.start:
                    ce = -logits_BTJV[b, t, k, e.ids[t + k + 2]]
                    kl = (
                        base_BTV[b, t + k + 1].exp()
                        * (base_BTV[b, t + k + 1] - logits_BTJV[b, t, k])
                    ).sum()
                    terms.append(0.75 * ce + 0.25 * kl)
        assert counts[k] == len(terms)
        ref = ref + c.decay**k * torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())


def test_training_lowers_loss_and_changes_only_the_heads(stories260k, examples):
    base_before = {k: v.clone() for k, v in stories260k.model.state_dict().items()}
    c = cfg(steps=8)
    batch = medusa.collate(examples[:8])
    hidden = medusa.base_hidden(stories260k, batch["ids_BT"], batch["lengths_B"])
    init = medusa.make_heads(stories260k, c)
    with torch.no_grad():
        loss_before, *_ = medusa.MedusaLoss(init, stories260k.lm_head.weight, c)(hidden, batch)
    result = medusa.train(stories260k, examples, c)
    with torch.no_grad():
        loss_after, *_ = medusa.MedusaLoss(result.heads, stories260k.lm_head.weight, c)(
            hidden, batch
        )
    assert float(loss_after) < float(loss_before) - 0.5, (float(loss_before), float(loss_after))
    for key, value in stories260k.model.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base parameter {key} changed"
    assert not any(p.requires_grad for p in stories260k.model.parameters())
    assert result.heads.lm_heads is None  # shared LM head: only the residual blocks train
    changed = [not torch.equal(a, b) for a, b in zip(init.parameters(), result.heads.parameters())]
    assert all(changed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_master_weights(stories260k, examples, precision):
    result = medusa.train(stories260k, examples, cfg(steps=3, precision=precision, loss_chunk=64))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in result.heads.parameters())
    assert result.losses[-1] < result.losses[0]


def test_resume_reaches_the_uninterrupted_weights_bit_for_bit(stories260k, examples, tmp_path):
    c = cfg()
    full = medusa.train(stories260k, examples, c, checkpoint_path=tmp_path / "a.safetensors")

    def interrupt(step, loss, top1):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        medusa.train(stories260k, examples, c, checkpoint_path=ckpt, on_step=interrupt)
    assert checkpoint.load_checkpoint(ckpt)["step"] == 3
    resumed = medusa.train(stories260k, examples, c, checkpoint_path=ckpt, resume=True)
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert full.losses[3:] == resumed.losses
    # The whole run's history came along in the checkpoint (metrics.json reports it).
    assert resumed.run_losses == full.losses == full.run_losses and resumed.resumed_from == [3]
    assert full.resumed_from == [] and resumed.run_wall_s > resumed.wall_s > 0
    for (name, a), b in zip(full.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TrainError, match="other settings"):
        medusa.train(stories260k, examples, cfg(lr=0.5), checkpoint_path=ckpt, resume=True)


def test_checkpoint_state_round_trips_exactly(tmp_path):
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1 / 3, "fused": None, "params": [0]}],
        "rng": checkpoint.rng_state(),
        "half": torch.randn(4).bfloat16(),
        "config": {"lr": 0.1 + 0.2, "kind": "medusa", "shared_lm_head": True},
    }
    checkpoint.save_checkpoint(tmp_path / "s.safetensors", state)
    back = checkpoint.load_checkpoint(tmp_path / "s.safetensors")
    assert back["optimizer"]["state"].keys() == {0}  # int keys stay ints (the optimizer needs it)
    assert torch.equal(back["optimizer"]["state"][0]["m"], state["optimizer"]["state"][0]["m"])
    assert back["optimizer"]["state"][0]["step"].shape == ()
    assert back["groups"] == state["groups"] and back["config"] == state["config"]
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], state["half"])
    assert back["rng"]["python"] == state["rng"]["python"]  # a tuple again: random.setstate
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_in_a_checkpoint_never_runs(stories260k, examples, tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    ckpt = tmp_path / "state.pt"
    # What older versions wrote (a torch.save pickle), with the payload inside; a bare pickle.
    older = io.BytesIO()
    torch.save({"step": 3, "x": _Payload(marker)}, older)
    for payload in (older.getvalue(), pickle.dumps(_Payload(marker))):
        ckpt.write_bytes(payload)
        with pytest.raises(TrainError, match="cannot read checkpoint .* not a train-heads"):
            medusa.train(stories260k, examples, cfg(), checkpoint_path=ckpt, resume=True)
        assert not marker.exists()


def test_resume_from_a_checkpoint_without_its_config_is_refused(stories260k, examples, tmp_path):
    ckpt = tmp_path / "state.safetensors"
    checkpoint.save_checkpoint(ckpt, {"step": 3, "heads": {}})
    with pytest.raises(TrainError, match="holds no training config"):
        medusa.train(stories260k, examples, cfg(), checkpoint_path=ckpt, resume=True)


def test_checkpoint_write_killed_midway_keeps_the_previous_one(
    stories260k, examples, tmp_path, monkeypatch
):
    real_save, calls = checkpoint.save_file, []

    def dying_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            return real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    ckpt = tmp_path / "state.safetensors"
    with pytest.raises(OSError, match="No space"):
        medusa.train(stories260k, examples, cfg(steps=6, checkpoint_every=2), checkpoint_path=ckpt)
    monkeypatch.undo()
    state = checkpoint.load_checkpoint(ckpt)
    assert state["step"] == 2 and set(state) >= {"heads", "optimizer", "scheduler", "rng"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # the temp file is gone


def test_evaluate_gives_per_head_accuracies(stories260k, examples):
    heads = medusa.make_heads(stories260k, cfg())
    metrics = medusa.evaluate(stories260k, heads, examples[:4])
    assert 0.3 < metrics["base_top1"] <= 1  # the base model knows its own domain
    for h in metrics["heads"]:
        assert 0 <= h["top1"] <= h["top5"] <= 1 and h["tokens"] > 0


def test_self_distill_is_greedy_decoding_and_resumes(stories260k, tmp_path):
    tok = stories260k.tokenizer
    prompts = [tok(p)["input_ids"] for p in ["Once upon a time", "Tom had", "The cat was very"]]
    config = DistillConfig(max_new_tokens=6, batch_size=2)

    def die(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after the first batch's shard is written
        self_distill(stories260k, prompts, tmp_path / "c", config, progress=die)
    data, stats = self_distill(stories260k, prompts, tmp_path / "c", config)
    assert stats.prompts_done == 1 and data["prompt_index"] == [0, 1, 2]
    for prompt, row in zip(prompts, data):
        ref = stories260k.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert row["input_ids"][: len(ref[0])] == ref[0].tolist()
        assert row["prompt_len"] == len(prompt)
    with pytest.raises(ValueError, match="other settings"):
        self_distill(stories260k, prompts, tmp_path / "c", DistillConfig(max_new_tokens=7))
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_records_of_every_kind(tmp_path, stories260k):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi there."}]))
    share = tmp_path / "s.jsonl"
    turns = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi! How are you?"}]
    share.write_text(json.dumps({"conversations": turns}) + "\n")
    parquet = tmp_path / "a.parquet"
    load_records(str(alpaca)).to_parquet(str(parquet))
    for path, kind in [(alpaca, "alpaca"), (share, "sharegpt"), (parquet, "alpaca")]:
        records = load_records(str(path))
        assert record_kind(records.column_names) == kind
        (ex,) = encode_dataset(stories260k.tokenizer, records, max_length=64)
        assert 2 <= ex.start < len(ex.ids)  # the loss starts at the answer
    train, held = split_eval([Example([1, 2, 3], 1)] * 40, 0.05)
    assert len(train) == 38 and len(held) == 2


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(TrainDataError, match="data file not found"):
        load_records(str(tmp_path / "missing.json"))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TrainDataError, match="unknown data format"):
        load_records(str(tmp_path / "d.csv"))
    (tmp_path / "odd.json").write_text(json.dumps([{"question": "?", "answer": "!"}]))
    with pytest.raises(TrainDataError, match="unknown record format"):
        record_kind(load_records(str(tmp_path / "odd.json")).column_names)
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainError, match="not writable"):
        cli.check_writable(tmp_path / "file" / "heads")
    rc = cli.main(["--model", "stories260k", "--data", str(tmp_path / "nope.txt"),
                  "--out", str(tmp_path / "h")])  # fmt: skip
    assert rc == 2 and "data file not found" in capsys.readouterr().err
    with pytest.raises(TrainError, match="checkpoint_every"):
        cfg(checkpoint_every=0)
    rc = cli.main(["--model", "stories260k", "--data", str(STORIES), "--out", str(tmp_path / "h"),
                   "--checkpoint-every", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        "train-heads: error: checkpoint_every (--checkpoint-every) must be positive, got 0"
    )


def test_metrics_record_paths_relative_to_the_repository():
    root = pipeline.ROOT
    assert pipeline.portable(str(root / "data" / "train" / "x.json")) == "data/train/x.json"
    assert pipeline.portable(f"--data={root}/data/x.txt") == "--data=data/x.txt"
    assert pipeline.portable("/elsewhere/x.txt") == "/elsewhere/x.txt"
    assert pipeline.portable("stories260k") == "stories260k"


def test_cli_writes_loadable_heads_and_metrics(stories_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "heads"
    argv = ["--model", "stories260k", "--data", str(stories_file), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--max-length", "48", "--num-heads", "2",
            "--precision", "fp32", "--eval-fraction", "0.1"]  # fmt: skip
    program = pipeline.ROOT / "medusa_engine" / "training" / "cli.py"
    monkeypatch.setattr(sys, "argv", [str(program), *argv])
    assert cli.main(argv) == 0, capsys.readouterr().err
    heads = load_heads(out, "medusa")
    assert heads.num_heads == 2 and heads.config.shared_lm_head
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["heads"]) == 2
    assert metrics["resumed_from"] == [] and metrics["eval_examples"] > 0
    assert [step for step, _ in metrics["loss_curve"]] == [1, 2]
    assert metrics["command"].startswith("medusa_engine/training/cli.py --model stories260k")
    assert (tmp_path / "heads" / "train_state.safetensors").is_file()
