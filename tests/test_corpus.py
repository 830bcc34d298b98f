"""Corpora larger than memory: streamed text shards, exact resume, disjoint
pipelines, the row-count index, and training on a glob."""

import json
import shutil
import textwrap

import numpy as np
import pytest
from run_helpers import REPO, run_cli, run_workers, scalars, train_args

from fmkeras.text.corpus import ShardedCorpus, expand_shards
from fmkeras.text.mlm import causal_lm_dataset, pack_sequences
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.train import main as train_main

pytestmark = pytest.mark.usefixtures("data_dir")  # every test here reads the datasets


@pytest.fixture(scope="module")
def shards(tmp_path_factory, gutenberg_lines):
    """Five shards of a corpus slice, one with a bad UTF-8 byte."""
    directory = tmp_path_factory.mktemp("shards")
    for index, part in enumerate(np.array_split(np.array(gutenberg_lines, object), 5)):
        (directory / f"part-{index}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    with open(directory / "part-2.txt", "ab") as handle:
        handle.write(b"a line with a bad byte \xff here\n")
    return directory


@pytest.fixture()
def corpus(shards, small_vocab, tmp_path):
    tokenizer = WordPieceTokenizer(small_vocab)
    return ShardedCorpus(expand_shards(shards / "*.txt"), tokenizer, 33, window=64,
                         index_path=tmp_path / "index.json", log=lambda _: None)  # fmt: skip


def lines_of(path):
    """A shard's lines as the stream reads them (bad bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.strip() for line in handle if line.strip()]


def rows_of(batches):
    return [token_ids for _, _, token_ids in batches.as_numpy_iterator()]


def test_each_shard_packs_as_a_file_does(corpus):
    tokenizer = corpus.tokenizer
    for path, count in zip(corpus.paths, corpus.counts, strict=True):
        assert count == len(pack_sequences(lines_of(path), tokenizer, 33))


def test_a_pass_reads_every_row_once_in_a_fresh_order(corpus):
    every = np.concatenate([pack_sequences(lines_of(path), corpus.tokenizer, 33)
                            for path in corpus.paths])  # fmt: skip
    steps = len(every) // 16
    streamed = np.concatenate(rows_of(corpus.batches(16, seed=3).take(2 * steps + 2)))
    first, second = streamed[: len(every)], streamed[len(every) : 2 * len(every)]
    assert sorted(map(tuple, first)) == sorted(map(tuple, every))
    assert not np.array_equal(first[:64], every[:64])  # shuffled
    assert not np.array_equal(first[:64], second[:64])  # a new order per pass


@pytest.mark.parametrize("start", [7, 150, 301])  # within pass 0, near its end, in pass 1
def test_a_resumed_stream_sees_exactly_the_batches_it_would_have_seen(corpus, start):
    full = rows_of(corpus.batches(16, seed=3).take(start + 4))
    resumed = rows_of(corpus.batches(16, seed=3, start_step=start).take(4))
    if start == 7:  # early in the first pass: only the first shard read was counted
        assert len(corpus.known) == 1
    assert len(corpus) // 16 < 301  # so the last case starts in the second pass
    for expected, found in zip(full[start:], resumed, strict=True):
        np.testing.assert_array_equal(found, expected)


def test_pipelines_read_disjoint_shards(corpus):
    seen = []
    for pipeline in range(2):
        rows = np.concatenate(rows_of(corpus.batches(16, 1, 0, pipeline, 2).take(10)))
        assert rows.shape == (80, 33)
        seen.append({tuple(row) for row in rows})
    assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="5 shard.s. cannot feed 6 pipelines"):
        corpus.batches(12, 1, 0, 5, 6)


def test_row_counts_are_kept_until_a_shard_changes(corpus, shards, tmp_path):
    counts = corpus.counts
    index = json.loads((tmp_path / "index.json").read_text())["rows"]
    assert [index[corpus.shard_key(path)] for path in corpus.paths] == counts
    said = []
    again = ShardedCorpus(corpus.paths, corpus.tokenizer, 33, index_path=tmp_path / "index.json",
                          log=said.append)  # fmt: skip
    assert again.counts == counts and said == []  # read from the index, not counted
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with open(copy / "part-0.txt", "a") as handle:
        handle.write("more text " * 200 + "\n")
    moved = ShardedCorpus(expand_shards(copy / "*.txt"), corpus.tokenizer, 33,
                          index_path=tmp_path / "index.json", log=said.append)  # fmt: skip
    assert moved.counts[0] > counts[0] and moved.counts[1:] == counts[1:]
    assert said == ["corpus: counting the rows of 5 shard(s) (once per corpus)"]


def test_causal_rows_shift_by_one(corpus):
    corpus = ShardedCorpus(corpus.paths, corpus.tokenizer, 17, framed=False, log=lambda _: None)
    inputs, labels = next(iter(causal_lm_dataset(corpus, 8, seed=1)))
    np.testing.assert_array_equal(inputs["token_ids"][:, 1:], labels[:, :-1])
    assert inputs["token_ids"].shape == (8, 16)


# The causal LM shares the streamed rows with mlm (its own stream is tested above): slow suite.
@pytest.mark.parametrize("task", ["mlm", pytest.param("causal_lm", marks=pytest.mark.slow)])
def test_training_streams_a_glob_of_shards_and_resumes(task, shards, small_vocab, tmp_path,
                                                       capsys):  # fmt: skip
    recipe = REPO / "trainers" / ("pretrain_gutenberg.yaml" if task == "mlm" else
                                  "causal_lm_gutenberg.yaml")  # fmt: skip
    settings = {"data.train_file": str(shards / "part-*.txt"), "data.vocab_file": small_vocab,
                "model.size": "tiny", "data.sequence_length": 32, "data.max_lines": 400,
                "train.batch_size": 8, "train.steps": 12, "train.checkpoint_every": 6,
                "train.eval_every": 12, "train.eval_steps": 2, "train.steps_per_execution": 1,
                "generate.prompts": "The"}  # fmt: skip
    run = tmp_path / "run"
    assert train_main(train_args(task, recipe, settings, run)) == 0
    assert "5 shard(s) streamed" in capsys.readouterr().out
    finished = json.loads((run / "metrics.json").read_text())
    # Resume from the middle: the same data, so the same final loss.
    shutil.rmtree(run / "backup" / "step-00000012")
    (run / "metrics.json").unlink()
    assert train_main(train_args(task, recipe, settings, run)) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 6
    assert resumed["loss"] == pytest.approx(finished["loss"], rel=1e-5)


def test_shard_errors_are_one_line(tmp_path, small_vocab, capsys):
    recipe = REPO / "trainers" / "pretrain_gutenberg.yaml"
    settings = {"data.train_file": str(tmp_path / "none-*.txt"), "data.vocab_file": small_vocab,
                "model.size": "tiny"}  # fmt: skip
    assert train_main(train_args("mlm", recipe, settings, tmp_path / "run")) == 2
    assert "no file matches" in capsys.readouterr().err
    settings["data.objective"] = "mlm_nsp"
    assert train_main(train_args("mlm", recipe, settings, tmp_path / "run")) == 2
    assert "needs one train_file, not the glob" in capsys.readouterr().err


@pytest.mark.slow  # two trainings, one in its own process: ~40 s (two_workers covers the pipelines)
def test_mirrored_replicas_read_the_stream_as_one_device_does(shards, small_vocab, tmp_path):
    """Under two replicas the input pipeline reads its shards and splits each
    global batch (distribute_datasets_from_function): the same trajectory."""
    recipe = REPO / "trainers" / "pretrain_gutenberg.yaml"
    settings = {"data.train_file": str(shards / "part-*.txt"), "data.vocab_file": small_vocab,
                "model.size": "tiny", "model.dropout": 0, "data.sequence_length": 32,
                "data.max_lines": 400, "train.batch_size": 8, "train.steps": 8,
                "train.checkpoint_every": 8, "train.eval_every": 8, "train.eval_steps": 2,
                "train.log_every": 2, "train.steps_per_execution": 1,
                "train.jit_compile": "false"}  # fmt: skip
    mirrored = {**settings, "distribute.strategy": "mirrored", "distribute.cpu_devices": 2}
    assert train_main(train_args("mlm", recipe, settings, tmp_path / "one")) == 0
    # In its own process: logical CPU devices must be set before TensorFlow starts.
    result = run_cli(train_args("mlm", recipe, mirrored, tmp_path / "mirrored"))
    assert result.returncode == 0, result.stderr
    losses = [dict(scalars(tmp_path / name / "logs" / "train", "loss")) for name in
              ("one", "mirrored")]  # fmt: skip
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 4, 6, 8]
    # Stated tolerance, as for in-memory data (tests/test_distribute.py): float32 sums.
    np.testing.assert_allclose([losses[1][s] for s in losses[0]], list(losses[0].values()),
                               rtol=5e-3)  # fmt: skip


STREAMS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fmkeras.config import DistributeConfig
    from fmkeras.distribute import create_strategy
    strategy = create_strategy(DistributeConfig(strategy="multi_worker"))
    from fmkeras.text.corpus import ShardedCorpus, expand_shards
    from fmkeras.text.wordpiece import WordPieceTokenizer
    shards, vocab = sys.argv[1:]
    corpus = ShardedCorpus(expand_shards(Path(shards) / "*.txt"), WordPieceTokenizer(vocab), 33,
                           window=64, log=lambda _: None)

    def pipeline(context):  # as LanguageModelTask.train_dataset builds it
        rows = corpus.batches(16, 3, 0, context.input_pipeline_id, context.num_input_pipelines)
        rows = rows.map(lambda first, positions, token_ids: token_ids)
        return rows.rebatch(context.get_per_replica_batch_size(16))

    batches = iter(strategy.distribute_datasets_from_function(pipeline))
    seen = [strategy.experimental_local_results(next(batches))[0].numpy().tolist()
            for _ in range(6)]
    print(json.dumps(seen))
""")


def test_two_workers_stream_their_own_shards(corpus, shards, small_vocab):
    results = run_workers(STREAMS, shards, small_vocab, cwd=REPO / "tests")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    workers = [np.array(json.loads(out.strip().splitlines()[-1])) for _, out, _ in results]
    for index, rows in enumerate(workers):  # each worker: its pipeline's stream, 8 rows a step
        expected = np.stack(rows_of(corpus.batches(16, 3, 0, index, 2).take(6)))
        np.testing.assert_array_equal(rows, expected)
    first, second = ({tuple(row) for row in rows.reshape(-1, 33)} for rows in workers)
    assert not first & second
