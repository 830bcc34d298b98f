"""Explanations: integrated gradients' completeness and their integration
rules, zero attribution for a token the model cannot see, the command line's
outputs for classify, tag and translate runs, the HTML report in a real
browser, and the faithfulness table."""

import html.parser
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import REPO
from run_helpers import train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmkeras.explain.attribution import RULES, attention_rollout, integration_points
from fmkeras.explain.command import main as explain_main
from fmkeras.explain.explainers import ClassifyExplainer
from fmkeras.explain.faithfulness import BINS, FRACTIONS, perturbations
from fmkeras.explain.report import NEGATIVE, POSITIVE, html_report
from fmkeras.models import Classifier, Encoder
from fmkeras.text.wordpiece import WordPieceTokenizer
from fmkeras.train import main as train_main

WORDS = "good bad film plot great dull the a and was".split()
TEXT = "the film was good and great"


@pytest.fixture(scope="module")
def sharp_classifier():
    """A tiny random classifier whose output moves visibly with its input
    (scaled embeddings and output kernel), wrapped like a classify run's predictor."""
    keras.utils.set_random_seed(1)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    encoder = Encoder(len(vocabulary), 2, 2, 16, 32, dropout=0.0, max_sequence_length=16)
    model = Classifier(encoder, 2, dropout=0.0)
    encoder.token_embedding.embeddings.assign(encoder.token_embedding.embeddings * 50)
    model.output_dense.kernel.assign(model.output_dense.kernel * 3000)
    tokenizer = WordPieceTokenizer(vocabulary)
    return SimpleNamespace(model=model, tokenizer=tokenizer, labels=["neg", "pos"],
                           info={"sequence_length": 16, "task": "classify"})  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_integration_rules_integrate_polynomials(rule):
    alphas, weights = integration_points(40, rule)
    assert weights.sum() == pytest.approx(1.0)
    exact = {"gausslegendre": 1e-12, "riemann_trapezoid": 1e-3, "riemann_middle": 1e-3}
    assert (weights * alphas**3).sum() == pytest.approx(0.25, abs=exact.get(rule, 0.02))


@pytest.mark.parametrize("output", ["probability", "logit"])
def test_attributions_add_up_to_the_change_of_the_output(sharp_classifier, output):
    explanation = ClassifyExplainer(sharp_classifier, output=output).explain(TEXT)
    assert [t.name for t in explanation.targets] == ["pos", "neg"]  # the predicted class first
    probabilities = explanation.prediction["probabilities"]
    for target in explanation.targets:
        if output == "probability":  # F(x) through the embeddings is the model's own output
            assert target.score == pytest.approx(probabilities[target.name], abs=1e-5)
        assert abs(target.score - target.baseline_score) > 1e-3  # not a vacuous check
        assert target.completeness_error < 0.01
        assert target.attributions["integrated_gradients"][[0, -1]].tolist() == [0, 0]  # CLS, SEP


def test_a_coarse_integral_fails_the_check_and_is_integrated_again(sharp_classifier):
    coarse = ClassifyExplainer(sharp_classifier, output="logit", steps=1, rule="riemann_left",
                               tolerance=0)  # fmt: skip
    assert max(t.completeness_error for t in coarse.explain(TEXT).targets) > 0.1
    refined = ClassifyExplainer(sharp_classifier, output="logit", steps=1, rule="riemann_left")
    targets = refined.explain(TEXT).targets
    assert all(t.completeness_error <= 0.01 and t.steps in (4, 16, 64, 256) for t in targets)


def test_a_token_the_model_cannot_see_gets_no_attribution(sharp_classifier):
    """Position 3 is masked out of every attention: nothing downstream reads it,
    although its embedding differs from the baseline's."""
    explainer = ClassifyExplainer(sharp_classifier, output="logit")
    ((ids, segments),) = explainer.encode([TEXT])
    item = explainer.items(ids, segments, 1)
    item["padding_mask"][3] = 0
    assert np.abs(item["vectors"][3] - item["baseline"][3]).sum() > 0
    ((attributions, score, baseline, _),) = explainer.attributor.integrated_gradients([item])
    (product,) = explainer.attributor.gradient_times_input([item])
    assert abs(attributions[3]) < 1e-7 and abs(product[3]) < 1e-7
    visible = np.delete(np.abs(attributions), [0, 3, len(ids) - 1])
    assert visible.max() > 1e-4
    assert abs(attributions.sum() - (score - baseline)) < 0.01 * abs(score - baseline)


def test_attention_rollout_of_identity_attention_is_the_identity():
    layers = [np.tile(np.eye(4), (2, 1, 1)), np.tile(np.eye(4), (2, 1, 1))]
    np.testing.assert_allclose(attention_rollout(layers), np.eye(4))
    uniform = [np.full((1, 4, 4), 0.25)]
    np.testing.assert_allclose(attention_rollout(uniform).sum(-1), np.ones(4))


def test_word_pieces_merge_into_words_with_their_sums(sharp_classifier):
    explanation = ClassifyExplainer(sharp_classifier).explain(TEXT)
    explanation.tokens[2:4] = ["fi", "##lm"]  # as if "film" were two pieces
    merged = explanation.merged_words()
    assert merged.tokens[2] == "film" and len(merged.tokens) == len(explanation.tokens) - 1
    for before, after in zip(explanation.targets, merged.targets, strict=True):
        values = before.attributions["integrated_gradients"]
        assert after.attributions["integrated_gradients"][2] == pytest.approx(values[2:4].sum())
        assert after.completeness_error == pytest.approx(before.completeness_error)


def test_perturbations_keep_cls_and_sep_and_split_the_tokens():
    ids, segments = [2, 10, 11, 12, 13, 3], [0] * 6
    ranking = [3, 1, 4, 2]  # content positions, best first
    removed, only, curve = perturbations(ids, segments, ranking, {2, 3})
    assert len(removed) == len(only) == len(BINS) and len(curve) == len(FRACTIONS)
    assert removed[0][0] == [2, 10, 11, 13, 3]  # at least one token: the best, position 3
    assert only[0][0] == [2, 12, 3]
    assert removed[-1][0] == [2, 11, 13, 3] and only[-1][0] == [2, 10, 12, 3]  # 50 %: two
    assert curve[0][0] == ids and curve[-1][0] == [2, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, classify_run):
    """`runs(task)`: a tiny classify (the session's), tag or translate run (a
    few steps; greedy, short final translation evaluations), trained on first use."""
    root = tmp_path_factory.mktemp("explain")
    settings = {"model.size": "tiny", "model.init": "random", "data.max_lines": 300,
                "data.vocab_size": 600, "train.batch_size": 16, "train.steps": 4,
                "train.checkpoint_every": 4, "train.eval_every": 4,
                "train.jit_compile": "false", "decode.beam_width": 1,
                "decode.max_length": 8}  # fmt: skip
    recipes = {"tag": "conll2003", "translate": "en_de"}

    def run(task):
        if task == "classify":
            return classify_run
        if not (root / task / "task.json").is_file():
            args = train_args(task, REPO / "trainers" / f"{recipes[task]}.yaml", settings,
                              root / task)  # fmt: skip
            assert train_main(args) == 0
        return root / task

    return run


TASK_TEXTS = {"classify": "a gorgeous , witty movie", "tag": "Angela Merkel visited Paris .",
              "translate": "A man rides a bike ."}  # fmt: skip


# The translate case trains an encoder-decoder: in the slow suite (the default stays < 10 min).
@pytest.mark.parametrize(
    "task", ["classify", "tag", pytest.param("translate", marks=pytest.mark.slow)]
)
def test_the_command_line_explains_every_task(runs, task, tmp_path, capsys):
    run = runs(task)
    capsys.readouterr()  # the training's log, if it trained here
    report, figures, logs = tmp_path / "report.html", tmp_path / "png", tmp_path / "tb"
    args = [str(run), TASK_TEXTS[task], "--json", "--steps", "20", "--html", str(report),
            "--png", str(figures), "--tensorboard", str(logs), "--max-length", "6"]  # fmt: skip
    assert explain_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"tokens", "attributions", "prediction", "completeness_error"} <= set(result)
    assert result["tokens"][0] == "[CLS]" and len(result["attributions"]) == len(result["tokens"])
    for target in result["targets"]:
        assert set(target["attributions"]) == {"integrated_gradients", "gradient_x_input",
                                               "attention_rollout"}  # fmt: skip
        change = target["score"] - target["baseline_score"]
        total = sum(target["attributions"]["integrated_gradients"])
        assert abs(total - change) <= 0.01 * abs(change) + 1e-6
    pictures = sorted(p.name for p in figures.iterdir())
    assert "self_attention_layer_0.png" in pictures
    if task == "translate":
        assert "cross_attention_layer_0.png" in pictures
        assert result["prediction"]["tokens"] and len(result["targets"]) == len(
            result["prediction"]["tokens"]
        )
    page = ReportParser.parse(report.read_text(encoding="utf-8"))
    assert page.tokens_per_row == [len(result["tokens"])] * (3 * len(result["targets"]))
    assert page.images == len(pictures)  # every figure is inlined
    events = EventAccumulator(str(logs), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]  # TF2 summaries: images and text are tensors
    assert {"explain/self_attention_layer_0", "explain/attributions_0"} <= set(tags)


class ReportParser(html.parser.HTMLParser):
    """Counts the shaded token spans per attribution row and the inlined images."""

    def __init__(self):
        super().__init__()
        self.tokens_per_row, self.images = [], 0

    @classmethod
    def parse(cls, text):
        parser = cls()
        parser.feed(text)
        parser.close()
        return parser

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "div" and attributes.get("class") == "tokens":
            self.tokens_per_row.append(0)
        elif tag == "span" and attributes.get("class") == "token":
            assert attributes["style"].startswith("background: rgba(")
            self.tokens_per_row[-1] += 1
        elif tag == "img":
            assert attributes["src"].startswith("data:image/png;base64,")  # self-contained
            self.images += 1


def screenshot(page, path, height, attempts=3):
    """The top `height` pixels of `page` as headless Chromium draws it. Under
    load Chromium has once returned a blank capture (it raced the first paint)
    and once hung: either is retried, a blank picture is never returned (so the
    "no shading" check below cannot pass on one), and a third failure fails."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("no chromium: apt-get install chromium")
    shot, said = path.with_suffix(".png"), ""
    for _ in range(attempts):
        shot.unlink(missing_ok=True)
        try:
            done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                   "--hide-scrollbars", f"--screenshot={shot}",
                                   f"--window-size=1000,{height}", page.as_uri()],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        except subprocess.TimeoutExpired:
            said = "timed out after 60 s"
            continue
        said = done.stderr[-500:]
        if shot.is_file():
            picture = np.asarray(keras.utils.load_img(shot), np.int16)
            if (picture < 100).all(-1).any():  # the page's text was drawn
                return picture
    pytest.fail(f"chromium drew no {page.name} in {attempts} attempts: {said}")


def shaded_pixels(picture):
    """Pixels within a few levels of the full green or red of a top token."""
    near = [np.abs(picture - np.array(colour)).max(-1) <= 6 for colour in (POSITIVE, NEGATIVE)]
    return int(np.sum(near[0] | near[1]))


def test_a_browser_shows_the_shaded_tokens(sharp_classifier, tmp_path):
    explanation = ClassifyExplainer(sharp_classifier, steps=16).explain(TEXT)
    report = tmp_path / "report.html"
    report.write_text(html_report(explanation), encoding="utf-8")
    # The top of the page: the token rows of the first class, above every figure.
    picture = screenshot(report, tmp_path / "shot", height=330)
    assert shaded_pixels(picture) > 100
    plain = tmp_path / "plain.html"  # the same page without shading shows none
    plain.write_text(report.read_text(encoding="utf-8").replace("background: rgba", "x: rgba"),
                     encoding="utf-8")  # fmt: skip
    assert shaded_pixels(screenshot(plain, tmp_path / "plain", height=330)) == 0


def test_faithfulness_ranks_methods_on_a_labelled_file(runs, data_dir, tmp_path, capsys):
    run = runs("classify")
    capsys.readouterr()
    out = tmp_path / "faithfulness.json"
    args = [str(run), "--data", str(data_dir / "sst2" / "dev.tsv"),
            "--faithfulness", "--limit", "12", "--steps", "8", "--out", str(out)]  # fmt: skip
    assert explain_main(args) == 0
    printed = capsys.readouterr().out
    assert "comprehensiveness" in printed and "random" in printed
    result = json.loads(out.read_text())
    assert result["texts"] == 12
    assert set(result["methods"]) == {"integrated_gradients", "gradient_x_input",
                                      "attention_rollout", "random"}  # fmt: skip
    for row in result["methods"].values():
        assert len(row["comprehensiveness_by_bin"]) == len(BINS)
        assert len(row["deletion_curve"]) == len(FRACTIONS)
        assert np.isfinite(
            [row["comprehensiveness"], row["sufficiency"], row["deletion_auc"]]
        ).all()
    # Every method deletes the same number of tokens per step: the curves share their ends.
    curves = [row["deletion_curve"] for row in result["methods"].values()]
    assert len({round(curve[0], 5) for curve in curves}) == 1
    assert len({round(curve[-1], 5) for curve in curves}) == 1


def test_explain_says_what_is_wrong_in_one_line(runs, mlm_run, tmp_path, capsys):
    classify, tag = runs("classify"), runs("tag")
    capsys.readouterr()
    assert explain_main([str(mlm_run), "some text"]) == 2
    assert "mlm runs cannot be explained" in capsys.readouterr().err
    assert explain_main([str(tag), "--data", "x.tsv", "--faithfulness"]) == 2
    assert "--faithfulness scores classify runs" in capsys.readouterr().err
    assert explain_main([str(tmp_path / "missing"), "text"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        explain_main([str(classify), "one", "two", "--html", "r.html"])
    assert "give one text" in capsys.readouterr().err
