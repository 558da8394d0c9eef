"""Run an ``amzft export --format gguf`` file in llama.cpp and compare its answers with amzft's.

    pip install llama-cpp-python          # builds llama.cpp from source (~20 min on 2 cores)
    python -m amzft export --ckpt_path best --format gguf --out exported/gguf
    python benchmarks/gguf_in_llama_cpp.py exported/gguf --ckpt_path best "Mog's Kittens"

For each title: llama.cpp's greedy answer to the training prompt (rendered from the export's
own ``amzft_prompt.json``), the same through the chat template stored in the GGUF (what Ollama
and llama.cpp's chat endpoints use), and, with ``--ckpt_path``, amzft's own raw greedy answer
from the checkpoint. Raw greedy on both sides (no repetition penalty: llama.cpp's applies to
the last 64 tokens only, transformers' to the whole sequence, so penalised answers differ by
design); prints whether the answers agree and for how many leading words.

llama-cpp-python is not a dependency of amzft: this is a check for people who ship GGUF files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def llama_answers(gguf: Path, prompt: dict, titles: list[str], max_tokens: int) -> list[tuple[str, str]]:
    from llama_cpp import Llama  # noqa: PLC0415 - optional: only this check needs it

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=None, verbose=False)
    answers = []
    for title in titles:
        question = prompt["question"].format(title=title)
        text = prompt["template"].format(instruction=question, input=prompt["input_text"])
        raw = llm(text, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                                          temperature=0.0, repeat_penalty=1.0)["choices"][0]["message"]["content"]
        answers.append((raw.strip(), chat.strip()))
    return answers


def amzft_answers(ckpt_path: str, titles: list[str], max_tokens: int) -> list[str]:
    from amzft.checkpoints.locate import resolve_ckpt_path  # noqa: PLC0415 - torch only when asked
    from amzft.inference.load import load_answerer  # noqa: PLC0415
    from amzft.model.decoding import GREEDY  # noqa: PLC0415
    from amzft.model.generation import generate_answers  # noqa: PLC0415
    from amzft.sources import force_offline  # noqa: PLC0415

    force_offline()
    loaded = load_answerer(resolve_ckpt_path(ckpt_path))  # already in eval mode
    module, fmt = loaded.module, loaded.prompt
    return [a.strip() for a in generate_answers(module, titles, fmt, max_tokens, options=GREEDY)]


def leading_words_shared(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="the folder `amzft export --format gguf` wrote")
    parser.add_argument("titles", nargs="+")
    parser.add_argument("--ckpt_path", default=None, help="also answer with amzft from this checkpoint")
    parser.add_argument("--max_tokens", type=int, default=32)
    args = parser.parse_args()

    ggufs = sorted(args.export_dir.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"{args.export_dir}: no .gguf file (run `amzft export --format gguf --out {args.export_dir}`)")
    prompt = json.loads((args.export_dir / "amzft_prompt.json").read_text())
    start = time.perf_counter()
    llama = llama_answers(ggufs[0], prompt, args.titles, args.max_tokens)
    print(f"{ggufs[0]} in llama.cpp: {time.perf_counter() - start:.1f} s for {len(args.titles)} titles x 2")
    ours = amzft_answers(args.ckpt_path, args.titles, args.max_tokens) if args.ckpt_path else [None] * len(args.titles)
    for title, (raw, chat), mine in zip(args.titles, llama, ours):
        print(f"\n--- {title}\nllama.cpp, training prompt: {raw}")
        print(f"llama.cpp, GGUF chat template: {'(identical)' if chat == raw else chat}")
        if mine is not None:
            same = "identical" if mine == raw else f"first {leading_words_shared(mine, raw)} words shared"
            print(f"amzft ({args.ckpt_path}): {mine}\n  -> {same}")


if __name__ == "__main__":
    main()
