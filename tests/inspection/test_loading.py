import numpy as np
import pytest

from engram.data.corpus import load_or_prepare, prepare_corpus
from engram.inspection.loading import checkpoint_folder, load_model, model_corpus, resolve_data


def test_checkpoint_and_data_of_a_run(trained_runs, engram_checkpoint, text_dir, tmp_path):
    assert checkpoint_folder(trained_runs / "engram") == engram_checkpoint
    assert checkpoint_folder(engram_checkpoint) == engram_checkpoint
    assert resolve_data(engram_checkpoint, None) == [str(text_dir)]  # from the run's run.json
    assert resolve_data(engram_checkpoint, ["other"]) == ["other"]
    with pytest.raises(ValueError, match=f"'{tmp_path}' is not a model folder"):
        checkpoint_folder(tmp_path)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text((engram_checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="no --data given and no run.json"):
        resolve_data(lone, None)


def test_raw_data_reads_as_in_training(engram_checkpoint, text_dir):
    model = load_model(engram_checkpoint, "cpu")
    corpus = model_corpus(model, [str(text_dir)])  # tokenised again, with the checkpoint's tokenizer file
    trained_on = load_or_prepare([str(text_dir)], tokenizer="bpe-300", progress=False)
    for split in ("train", "val"):
        assert np.array_equal(corpus.tokens(split), trained_on.tokens(split))
    assert model_corpus(model, [str(trained_on.path)]).path == trained_on.path  # a prepared corpus, same file


def test_corpus_of_another_tokenizer_is_refused(engram_checkpoint, text_dir, tmp_path):
    prepare_corpus([str(text_dir)], tmp_path / "corpus", tokenizer="bpe-280", workers=1, progress=False)
    with pytest.raises(ValueError, match="was tokenised with 'bpe-280', not with the checkpoint's tokenizer"):
        model_corpus(load_model(engram_checkpoint, "cpu"), [str(tmp_path / "corpus")])
