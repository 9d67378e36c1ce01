"""`medusa-engine chat`: a multi-turn terminal chat over the engine.

The conversation's KV cache is kept between turns: each turn renders the whole conversation to
token ids and the engine prefills only what its session does not already hold (the longest
common prefix is reused). Models without a chat template continue plain text: each message is
appended as it is typed.

Commands: `/reset` (new conversation), `/stats` (totals so far), `/quit`. Ctrl-C stops the
reply being written (the program goes on); end of input exits cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from medusa_engine.generate import GenerationResult, MedusaGenerator
from medusa_engine.hf_adapter import encode_chat, has_chat_template
from medusa_engine.model import ContextOverflowError

HELP = "commands: /reset  /stats  /quit   (Ctrl-C stops a reply, Ctrl-D exits)"


@dataclass
class ChatStats:
    replies: int = 0
    tokens: int = 0
    steps: int = 0
    accepted: int = 0  # tokens emitted by verification steps (all but each prefill's first)
    seconds: float = 0.0

    def add(self, result: GenerationResult) -> None:
        self.replies += 1
        self.tokens += len(result.token_ids)
        self.steps += result.steps
        self.accepted += sum(result.accepted_lengths)
        self.seconds += result.total_s

    def line(self) -> str:
        tau = self.accepted / self.steps if self.steps else 0.0
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return f"{self.replies} replies, {self.tokens} tokens, {rate:.1f} tok/s, τ={tau:.2f}"


@dataclass
class Conversation:
    """Messages, rendered to token ids with the tokenizer's chat template (or as plain text)."""

    tokenizer: Any
    messages: list[dict[str, str]] = field(default_factory=list)
    raw_ids: list[int] = field(default_factory=list)  # plain-text mode: the ids so far

    def with_user(self, text: str) -> list[int]:
        """Token ids of the conversation plus a new user message, ready for the reply."""
        if has_chat_template(self.tokenizer):
            return encode_chat(self.tokenizer, [*self.messages, {"role": "user", "content": text}])
        if self.raw_ids:
            return self.raw_ids + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(self.tokenizer(text)["input_ids"])

    def commit(self, text: str, prompt_ids: list[int], reply_ids: list[int], reply: str) -> None:
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply},
        ]
        self.raw_ids = prompt_ids + reply_ids

    def reset(self) -> None:
        self.messages.clear()
        self.raw_ids.clear()


class ChatLoop:
    """Reads messages from `stdin`, streams replies to `stdout`."""

    def __init__(
        self, engine: MedusaGenerator, max_new_tokens: int, stdin: TextIO, stdout: TextIO
    ) -> None:
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.stdin, self.stdout = stdin, stdout
        self.tty = stdout.isatty()
        tokenizer = engine.model.tokenizer
        self.tokenizer = tokenizer
        self.conversation = Conversation(tokenizer)
        self.session = engine.model.new_session()
        self.stats = ChatStats()

    def dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.tty else text

    def say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def run(self) -> int:
        self.say(
            self.dim(f"{self.engine.model.name} · tree {self.engine.tree.num_nodes} nodes · {HELP}")
        )
        while True:
            self.say("> ", end="")
            try:
                line = self.stdin.readline()
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                self.say()
                continue
            except UnicodeDecodeError:  # bytes that are not text: the conversation goes on
                line = "\udcff"
            if not _is_text(line):
                self.say(self.dim("(that line was not valid UTF-8 text; type it again)"))
                continue
            if not line:  # end of input
                self.say()
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                return 0
            if text == "/reset":
                self.conversation.reset()
                self.session = self.engine.model.new_session()
                self.say(self.dim("(new conversation)"))
            elif text == "/stats":
                self.say(self.dim(self.stats.line()))
            elif text.startswith("/"):
                self.say(self.dim(f"unknown command {text.split()[0]}; {HELP}"))
            else:
                self.reply(text)

    def reply(self, text: str) -> None:
        prompt_ids = self.conversation.with_user(text)
        try:
            self.engine.model.check_fits(len(prompt_ids) + 1)
        except ContextOverflowError as err:
            self.say(self.dim(f"(not sent: {err}; shorten it or /reset)"))
            return
        result = GenerationResult()
        shown = ""
        try:
            for _ in self.engine.stream(
                prompt_ids, self.max_new_tokens, session=self.session, result=result
            ):
                reply = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
                self.say(reply[len(shown) :], end="")
                shown = reply
        except KeyboardInterrupt:
            # The step may have stopped between cache and bookkeeping: start a fresh cache; the
            # next turn re-prefills the conversation.
            self.session = self.engine.model.new_session()
            result.finish_reason = "interrupted"
        self.say()
        self.conversation.commit(text, prompt_ids, result.token_ids, shown)
        self.stats.add(result)
        note = " · context full, /reset" if result.finish_reason == "context" else ""
        self.say(
            self.dim(
                f"[{len(result.token_ids)} tokens · {result.tokens_per_s:.1f} tok/s · "
                f"τ={result.mean_accepted:.2f}{note}]"
            )
        )


def _is_text(line: str) -> bool:
    """False for lines holding bytes that were not UTF-8 (surrogate escapes)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
