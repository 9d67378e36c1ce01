"""Token ids -> text deltas for a stream: incomplete UTF-8 and partial stop strings held back.

`TextStream` is the one path from a request's token ids to its reply text, for streamed and
non-streamed responses alike (a non-streamed reply is the concatenation of the deltas), so the two
are equal by construction.

* `IncrementalDetokenizer` decodes a short window of ids (the last emitted tokens plus the new
  ones) instead of the whole reply each step, and emits the new text when it does not end in
  U+FFFD: a byte-fallback token that starts a multi-byte character decodes to U+FFFD until its
  last byte arrives. The window keeps the tokens before the new ones so that tokenizers that strip
  a word's leading space at the start of a decode (SentencePiece's "▁") strip it from both texts
  alike (the way vLLM and TGI detokenize).
  For valid UTF-8 the deltas add up to the whole reply's decode. Bytes that never form UTF-8
  decode with context (a byte-fallback decoder replaces every byte of a bad run, so a byte that
  read as a letter becomes U+FFFD when a bad byte follows it); then the deltas may differ from a
  whole decode in those replacement characters, and the streamed and whole replies still agree.
* `StopMatcher` cuts the text before the first stop string and holds back any suffix that could
  still grow into one, so a stop string split across steps is never half sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole character

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Feed token ids with `add`, get the newly complete text; `flush` gives what is left."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids[prefix:read] were emitted last time
        self.read = 0  # ids[:read] are emitted

    def _pending(self) -> tuple[str, str]:
        emitted = self.decode(self.ids[self.prefix : self.read])
        return emitted, self.decode(self.ids[self.prefix :])

    def add(self, tokens: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in tokens)
        emitted, window = self._pending()
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still incomplete: wait for its bytes
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(emitted) :]

    def flush(self) -> str:
        """The text not yet emitted, incomplete characters included (as U+FFFD)."""
        emitted, window = self._pending()
        self.prefix = self.read = len(self.ids)
        return window[len(emitted) :]


class StopMatcher:
    """Text in, text safe to send out; stops at the first stop string (which is not sent)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.text = ""  # everything received
        self.sent = 0  # text[:sent] went out
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def push(self, text: str) -> str:
        """Add `text`; return what may be sent now. After a stop string, always ''."""
        if self.stopped:
            return ""
        self.text += text
        # A match cannot start before `sent`: text there was neither a stop nor a stop's prefix.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end of generation: the held-back text (it never became a stop string)."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass
class Delta:
    text: str
    stopped: bool  # a stop string was reached: the reply ends here


class TextStream:
    """A reply's token ids -> text deltas (detokenized, cut at stop strings)."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(decode)
        self.matcher = StopMatcher(stops)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, tokens: Sequence[int]) -> Delta:
        out = self.matcher.push(self.detokenizer.add(tokens)) if tokens else ""
        self.text += out
        return Delta(out, self.matcher.stopped)

    def finish(self) -> Delta:
        """The end of generation: incomplete characters and held-back text go out."""
        out = self.matcher.push(self.detokenizer.flush())
        out += self.matcher.flush()
        self.text += out
        return Delta(out, self.matcher.stopped)
