"""DeepTalk Space: ask by voice (or text), hear the spoken answer while it is being generated, and see
which experts the router picked for text tokens and for speech tokens.

Written by `deeptalk.hub.create_space`. Settings (environment variables override the defaults below):

* ``DEEPTALK_MODEL`` -- Hub repo id or local folder of the DeepTalk model (processor and codec in it);
* ``DEEPTALK_MAX_STEPS`` -- decoder steps per reply at most (one step = one codec frame of speech);
* ``DEEPTALK_CHUNK_FRAMES`` -- codec frames per streamed audio chunk (smaller: earlier first audio);
* ``DEEPTALK_STRATEGY`` -- ``single_pass`` or ``batch_parallel`` decoding.
"""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path

import gradio as gr
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

HERE = Path(__file__).resolve().parent
TITLE = "__DEEPTALK_TITLE__"
DEFAULT_MODEL = "__DEEPTALK_MODEL__"
MAX_STEPS = int(os.environ.get("DEEPTALK_MAX_STEPS", "__DEEPTALK_MAX_STEPS__"))
CHUNK_FRAMES = int(os.environ.get("DEEPTALK_CHUNK_FRAMES", "__DEEPTALK_CHUNK_FRAMES__"))
STRATEGY = os.environ.get("DEEPTALK_STRATEGY", "__DEEPTALK_STRATEGY__")
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg"}
EXAMPLES = sorted(str(p) for p in (HERE / "examples").glob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
TABLE_HEADERS = ["MoE layer", "text tokens: top experts", "speech tokens: top experts"]
SHARE_HEADERS = ["text -> speech experts", "speech -> speech experts"]


def model_location() -> str:
    """`DEEPTALK_MODEL` if set, else the model given to `create_space`; a relative folder is taken
    relative to this file (a model bundled into the Space)."""
    location = os.environ.get("DEEPTALK_MODEL") or DEFAULT_MODEL
    if not os.path.isabs(location) and (HERE / location).is_dir():
        return str(HERE / location)
    return location


def load_chat():
    """The model, processor and codec, loaded once when the Space starts."""
    import torch

    from deeptalk.generation import SpeechChat

    device = os.environ.get("DEEPTALK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else None  # GPU Spaces: bf16 weights, as in training
    return SpeechChat.from_pretrained(model_location(), device=device, dtype=dtype, output_expert_load=True)


def wav_bytes(waveform, sampling_rate: int) -> bytes:
    """One audio chunk as 16-bit mono WAV bytes, the form gradio streams without re-scaling: a float
    array would be peak-normalised chunk by chunk, so loudness would jump at every chunk."""
    pcm = (np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(sampling_rate))
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def model_expert_info(chat) -> tuple[list[int] | None, list[list[int]] | None]:
    """(decoder layer index of each MoE layer, speech experts of each MoE layer) from the model's
    config where it has them, so the view can name layers and mark the speech experts."""
    config = getattr(getattr(chat, "model", None), "config", None)
    layers = getattr(config, "moe_layer_indices", None)
    speech_experts = getattr(config, "speech_experts", None)
    return (list(layers) if layers else None), (speech_experts or None)


def _counts(expert_load) -> np.ndarray:
    counts = np.asarray(expert_load.detach().cpu() if hasattr(expert_load, "detach") else expert_load, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[1] != 2:
        raise ValueError(f"expert_load must be [num_moe_layers, 2, num_routed_experts] (row 0 text, row 1 speech), "
                         f"got shape {tuple(counts.shape)}")
    return counts


def expert_table(expert_load, layer_indices=None, speech_experts=None, top: int = 3) -> list[list]:
    """One row per MoE layer: the `top` experts most often selected for text tokens and for speech
    tokens ("e5 x12" = expert 5 selected 12 times), and, when the speech experts are known, the share
    of each modality's selections that went to them (modality separation at a glance)."""
    counts = _counts(expert_load)
    rows = []
    for layer, per_modality in enumerate(counts):
        row = [layer_indices[layer] if layer_indices else layer]
        for selections in per_modality:
            ranked = [e for e in np.argsort(-selections, kind="stable")[:top] if selections[e] > 0]
            row.append(", ".join(f"e{e} x{int(selections[e])}" for e in ranked) or "-")
        if speech_experts:
            for selections in per_modality:
                total = selections.sum()
                row.append(f"{100 * selections[speech_experts[layer]].sum() / total:.0f}%" if total else "-")
        rows.append(row)
    return rows


def expert_heatmap(expert_load, layer_indices=None, speech_experts=None):
    """Two heatmaps side by side (text tokens, speech tokens): per MoE layer, the share of that
    modality's router selections each expert received. Speech experts are outlined."""
    counts = _counts(expert_load)
    num_layers, _, num_experts = counts.shape
    totals = counts.sum(axis=2, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    # a bare Figure, not pyplot: nothing is kept in a global registry, so no figure leaks per request
    figure = Figure(figsize=(10, 1.2 + 0.35 * num_layers), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for modality, (axis, name) in enumerate(zip(axes, ("text tokens", "speech tokens"))):
        image = axis.imshow(shares[:, modality], aspect="auto", cmap="viridis", vmin=0, vmax=max(shares.max(), 1e-9))
        axis.set_title(f"{name} ({int(counts[:, modality].sum())} selections)")
        axis.set_xlabel("routed expert")
        for layer, experts in enumerate(speech_experts or []):
            for expert in experts:
                axis.add_patch(Rectangle((expert - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        if num_experts <= 32:
            axis.set_xticks(range(num_experts))
    axes[0].set_ylabel("MoE layer")
    axes[0].set_yticks(range(num_layers), [str(i) for i in (layer_indices or range(num_layers))])
    figure.colorbar(image, ax=axes, label="share of selections", shrink=0.9)
    return figure


def reply_summary(reply) -> str:
    """One status line: decoder steps, time to the first audio chunk and in total, length of speech."""
    if reply.waveform is None:
        spoken = "no codec, so no speech"
    elif reply.waveform.size == 0:
        spoken = "no speech frames generated"
    else:
        spoken = f"{reply.waveform.size / reply.sampling_rate:.2f} s of speech"
    first = reply.timings.get("first_audio_chunk")
    latency = f", first audio chunk after {first:.2f} s" if first is not None else ""
    return f"{reply.steps} decoder steps in {reply.timings.get('total', 0.0):.2f} s{latency}; {spoken}"


def build_demo(chat) -> gr.Blocks:
    """The UI around `chat` (a `deeptalk.generation.SpeechChat`)."""
    from deeptalk.generation import AudioChunk, TextDelta

    layer_indices, speech_experts = model_expert_info(chat)
    headers = TABLE_HEADERS + (SHARE_HEADERS if speech_experts else [])

    def respond(audio, text, history, strategy, max_steps):
        text = (text or "").strip() or None
        if audio is None and text is None:
            raise gr.Error("Record or upload a spoken question, or type one, then press Ask.")
        reply_text, first_audio = "", False
        # the question is asked: clear the inputs for the next turn, and the previous answer
        yield {question_audio: None, question_text: "", reply_box: "", status: "thinking ..."}
        events = chat.stream(audio=audio, text=text, history=history or None, strategy=strategy,
                             max_steps=int(max_steps), chunk_frames=CHUNK_FRAMES)
        while True:
            try:
                event = next(events)
            except StopIteration:
                return
            except (ValueError, FileNotFoundError) as err:  # bad input (silent, too long, unreadable audio...)
                yield {status: f"**Could not answer:** {err}"}
                raise gr.Error(str(err)) from None
            if isinstance(event, TextDelta):
                reply_text += event.text
                yield {reply_box: reply_text}
            elif isinstance(event, AudioChunk):
                if event.waveform.size == 0:
                    continue
                update = {reply_audio: wav_bytes(event.waveform, event.sampling_rate)}
                if not first_audio:
                    first_audio = True
                    update[status] = f"first audio after {event.elapsed_s:.2f} s ..."
                yield update
            else:  # the ChatReply, always last
                yield {reply_box: event.text, status: reply_summary(event), history_state: event.history,
                       **expert_view(event.expert_load)}

    def expert_view(expert_load) -> dict:
        if expert_load is None:
            return {expert_plot: None, expert_rows: None}
        return {expert_plot: expert_heatmap(expert_load, layer_indices, speech_experts),
                expert_rows: expert_table(expert_load, layer_indices, speech_experts)}

    def new_conversation():
        return [], None, "", None, "", None

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nAsk a question by voice (record or upload) or type it. The spoken answer "
                    "streams back while it is being generated; below, which experts the router picked for the "
                    "text tokens and for the speech tokens of the conversation.")
        history_state = gr.State([])
        with gr.Row():
            with gr.Column():
                question_audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Spoken question",
                                          elem_id="question-audio")
                question_text = gr.Textbox(label="...or a typed question", lines=2, elem_id="question-text")
                with gr.Accordion("Decoding", open=False):
                    strategy = gr.Radio(["single_pass", "batch_parallel"], value=STRATEGY, label="strategy")
                    max_steps = gr.Slider(1, max(MAX_STEPS, 400), value=MAX_STEPS, step=1, label="max decoder steps")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="new-conversation")
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=[question_audio], label="Example questions")
            with gr.Column():
                reply_audio = gr.Audio(label="Spoken answer", streaming=True, autoplay=True, interactive=False,
                                       elem_id="reply-audio")
                reply_box = gr.Textbox(label="Answer (text)", interactive=False, elem_id="reply-text")
                status = gr.Markdown(elem_id="reply-status")
        gr.Markdown("### Which experts fired (prompt + answer)")
        expert_plot = gr.Plot(label="Router selections per MoE layer", elem_id="expert-plot")
        expert_rows = gr.Dataframe(headers=headers, label="Top experts per MoE layer", interactive=False,
                                   elem_id="expert-table")
        outputs = [question_audio, question_text, reply_box, reply_audio, status, expert_plot, expert_rows,
                   history_state]
        inputs = [question_audio, question_text, history_state, strategy, max_steps]
        # one model, one request at a time: SpeechChat serialises its requests, and so does the queue
        ask.click(respond, inputs, outputs, concurrency_limit=1, concurrency_id="model")
        question_text.submit(respond, inputs, outputs, concurrency_limit=1, concurrency_id="model")
        clear.click(new_conversation, None, [history_state, reply_audio, reply_box, expert_plot, status, expert_rows])
    return demo


if __name__ == "__main__":
    build_demo(load_chat()).queue().launch()
