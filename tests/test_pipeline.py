"""pipeline.run as a sweep uses it: the dense model's scores are computed once per setting, then shared."""

from llmprune import pipeline
from llmprune.config import PruneConfig, RunConfig
from llmprune.recovery.lora import RecoverConfig


def test_dense_scores_are_shared_across_a_sweep(tmp_path, tiny_dir, monkeypatch):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(f'{{"text": "Sentence {i} of a small corpus, with a few more words."}}' for i in range(300)))
    passes = []
    real = pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, **k: passes.append(k["desc"]) or real(*a, **k))

    def config(method, windows=2):
        return RunConfig(model=str(tiny_dir), prune=PruneConfig(method=method, nsamples=2, seqlen=16),
                         calib=f"file:{text}", eval=f"file:{text}", eval_windows=windows)

    cache: dict = {}
    first = pipeline.run(config("wanda"), progress=False, dense_cache=cache)
    second = pipeline.run(config("magnitude"), progress=False, dense_cache=cache)
    assert passes == ["perplexity (dense)", "perplexity (pruned)", "perplexity (pruned)"]
    assert second["perplexity"]["dense"] == first["perplexity"]["dense"]
    assert second["perplexity"]["pruned"] != first["perplexity"]["pruned"]

    third = pipeline.run(config("magnitude", windows=3), progress=False, dense_cache=cache)  # another setting
    assert passes[3:] == ["perplexity (dense)", "perplexity (pruned)"]
    assert third["perplexity"]["windows"] == 3


def test_recovery_reports_the_sparsity_it_kept(tmp_path, tiny_dir):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    report = pipeline.run(RunConfig(model=str(tiny_dir), prune=PruneConfig(method="wanda", nsamples=2, seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, recover="lora",
                                    recovery=RecoverConfig(steps=2, batch=1, seqlen=16)), progress=False)
    assert report["recovery"]["achieved_sparsity"] == report["achieved_sparsity"] > 0.49
    assert set(report["perplexity"]) >= {"dense", "pruned", "recovered"}
