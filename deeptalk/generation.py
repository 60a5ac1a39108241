"""Speaking: single-pass multi-stream decoding of a text + speech answer.

Each decoder step emits one token per stream from the one forward pass: the text stream from the
text slice of the head, audio stream i from its own slice. The delayed layout is enforced by rule
(stream i is PAD_A for its first `delay_i` steps, PAD_A after its EOA; the text stream is PAD_T
after EOT), so the model only ever chooses among tokens the layout allows. Decoding uses the KV
cache: the prompt is prefilled once, then one `[B, 1 + N, 1]` column is fed per step.

This is the paper's "single-pass" variant; the batch-parallel variant (a text-only copy supplying
the text stream) and streaming come with the chat/streaming work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpeechAnswer:
    text: str
    codes: torch.Tensor  # [N, frames]
    layout: torch.Tensor  # [1 + N, steps] the generated answer in the delayed layout
    steps: int


@torch.no_grad()
def generate_speech_answer(
    model,
    processor,
    conversation: list[dict],
    *,
    max_steps: int = 200,
    text_repetition_penalty: float = 1.0,
    use_cache: bool = True,
) -> SpeechAnswer:
    """Greedy text + speech answer to `conversation` (ending with a user turn). `use_cache=False`
    re-runs the whole sequence every step (the reference the cached path is tested against)."""
    layout = processor.layout
    batch = processor(conversation, add_generation_prompt=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    model.eval()

    out = model(**batch, use_cache=use_cache, logits_to_keep=1)
    cache, attention_mask = out.cache, batch["attention_mask"]
    sequence = batch["input_ids"]
    text_done, audio_done = False, [False] * layout.num_audio_streams
    eoa = [layout.audio_special_id("<|eoa|>", i) for i in range(layout.num_audio_streams)]
    pad_a = [layout.audio_special_id("<|pad_a|>", i) for i in range(layout.num_audio_streams)]
    generated_text: list[int] = []
    columns = []
    for step in range(max_steps):
        logits = out.logits[0, -1]
        column = [layout.pad_t_id if text_done else _pick_text(model, logits, generated_text, text_repetition_penalty)]
        if not text_done:
            generated_text.append(column[0])
            text_done = column[0] == layout.eot_id
        for i, delay in enumerate(layout.delays):
            if step < delay or audio_done[i]:
                column.append(pad_a[i])
                continue
            start, _ = layout.stream_range(i + 1)
            allowed = model.stream_logits(logits, i + 1)[: layout.codebook_size + 1]  # codes and EOA
            token = start + int(allowed.argmax())
            audio_done[i] = token == eoa[i]
            column.append(token)
        columns.append(column)
        if text_done and all(audio_done):
            break
        step_ids = torch.tensor(column, device=device).view(1, -1, 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
        if use_cache:
            out = model(input_ids=step_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            cache = out.cache
        else:
            sequence = torch.cat([sequence, step_ids], dim=-1)
            audio_mask = torch.nn.functional.pad(batch["audio_input_mask"], (0, sequence.shape[-1] - batch["audio_input_mask"].shape[-1]))
            inputs = {**batch, "input_ids": sequence, "attention_mask": attention_mask, "audio_input_mask": audio_mask}
            out = model(**inputs, use_cache=False, logits_to_keep=1)
    grid = torch.tensor(columns, dtype=torch.long).T
    text, codes = processor.decode_turn(grid)
    return SpeechAnswer(text=text, codes=codes, layout=grid, steps=len(columns))


def _pick_text(model, logits, history: list[int], repetition_penalty: float) -> int:
    text_logits = model.stream_logits(logits, 0).clone()
    if repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=text_logits.device)
        values = text_logits[seen]
        text_logits[seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
    return int(text_logits.argmax())
