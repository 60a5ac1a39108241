"""Word / character error rate as a Hugging Face `evaluate` metric that loads offline.

The Hub's `wer` and `cer` metrics need the network the first time; this one ships inside deeptalk::

    import evaluate
    from deeptalk.evaluation import ERROR_RATE_METRIC_PATH

    wer = evaluate.load(ERROR_RATE_METRIC_PATH)                    # config "wer" (the default)
    cer = evaluate.load(ERROR_RATE_METRIC_PATH, config_name="cer")
    wer.compute(predictions=["a x c"], references=["a b c"])        # {"wer": 0.333...}

Corpus-level rates computed with jiwer: total edits / total reference words (or characters), the
number Mini-Omni / LLaMA-Omni / Whisper papers report. No normalisation happens here (deeptalk's
`word_error_rate` normalises before calling it). The file is self-contained because `evaluate`
copies it into its module cache and imports it from there.
"""

import datasets
import evaluate
import jiwer

_DESCRIPTION = """Corpus-level word error rate (config "wer") or character error rate (config "cer"), computed
with jiwer: (substitutions + deletions + insertions) / number of reference words (characters)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of transcripts to score (hypotheses).
    references: list of reference transcripts, one per prediction; none may be empty.
Returns:
    {"wer": float} or {"cer": float}: 0.0 is perfect; it can exceed 1.0 when the predictions insert words.
"""

_CITATION = """@inproceedings{morris2004,
  title={From WER and RIL to MER and WIL: improved evaluation measures for connected speech recognition},
  author={Morris, Andrew Cameron and Maier, Viktoria and Green, Phil D},
  booktitle={Interspeech}, year={2004}
}"""

RATES = {"wer": jiwer.wer, "cer": jiwer.cer}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ErrorRate(evaluate.Metric):
    @property
    def rate(self) -> str:
        """ "wer" or "cer": `evaluate.load` without `config_name` gives "default", which means WER."""
        return "wer" if self.config_name == "default" else self.config_name

    def _info(self):
        if self.rate not in RATES:
            raise ValueError(
                f"Unknown error rate {self.config_name!r}: load this metric with config_name='wer' or 'cer'."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/jitsi/jiwer/"],
            reference_urls=["https://en.wikipedia.org/wiki/Word_error_rate"],
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        if not references:
            raise ValueError("An error rate needs at least one reference.")
        if any(not str(r).strip() for r in references):
            raise ValueError("A reference is empty: word/character error rates are undefined for it.")
        return {self.rate: float(RATES[self.rate](list(references), list(predictions)))}
