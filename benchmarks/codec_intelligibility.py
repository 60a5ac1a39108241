# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Judge accuracy on MelVQ round trips of the demo test split's reference answers, per codec option.

The Whisper judge (`deeptalk.evaluation.judge.default_judge`, the `whisper` extra) transcribes each distinct reference
recording, and its round trip through each codec, once; accuracy is per test record (exact match after Whisper's
English normaliser). One JSON line per option::

    python benchmarks/codec_intelligibility.py                       # the quickstart's codec and the originals
    python benchmarks/codec_intelligibility.py --option '{"n_mels": 128, "codebook_size": 512}' --option unquantised
    python benchmarks/codec_intelligibility.py --column answer_sentence_audio

An option is `original` (the recordings themselves), `default` (`fit_demo_codec()`), or a JSON dict of
`fit_demo_codec` / `MelVQCodec` options plus `"unquantised": true` (log-mel -> Griffin-Lim without the VQ, the ceiling
of that mel setting).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

TEXT_COLUMNS = {"answer_audio": "answer_text", "answer_sentence_audio": "answer_sentence"}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--column", default="answer_audio", choices=sorted(TEXT_COLUMNS))
    parser.add_argument("--option", action="append", help="original, default, or a JSON dict (repeatable)")
    args = parser.parse_args(argv)

    import soundfile
    import torch

    from deeptalk.data import read_demo_records
    from deeptalk.evaluation.judge import default_judge, normalize_transcript
    from deeptalk.recipes.demo_data import fit_demo_codec

    torch.set_num_threads(1)
    judge = default_judge()
    records = read_demo_records("spoken_qa", "test")
    counts = collections.Counter(r[args.column] for r in records)
    wanted = {r[args.column]: normalize_transcript(r[TEXT_COLUMNS[args.column]]) for r in records}
    originals = {path: soundfile.read(path, dtype="float32") for path in counts}

    def accuracy(clips: dict) -> float:
        heard = dict(zip(counts, judge.transcribe([clips[path] for path in counts])))
        return sum(n * (normalize_transcript(heard[path]) == wanted[path]) for path, n in counts.items()) / len(records)

    for option in args.option or ["original", "default"]:
        started = time.perf_counter()
        if option == "original":
            clips, streams = originals, None
        else:
            settings = {} if option == "default" else json.loads(option)
            unquantised = settings.pop("unquantised", False)
            codec = fit_demo_codec(**settings)
            with torch.no_grad():
                if unquantised:
                    mels = {p: codec.log_mel(codec.prepare_waveform(torch.from_numpy(w), rate))
                            for p, (w, rate) in originals.items()}
                    clips = {p: (codec.synthesize(mel).numpy(), codec.sampling_rate) for p, mel in mels.items()}
                else:
                    clips = {p: (codec.decode(codec.encode(torch.from_numpy(w), rate)).numpy(), codec.sampling_rate)
                             for p, (w, rate) in originals.items()}
            streams = None if unquantised else codec.num_streams
        print(json.dumps({"column": args.column, "option": option, "streams": streams,
                          "accuracy": round(accuracy(clips), 3), "records": len(records), "judge": judge.judge_name,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
