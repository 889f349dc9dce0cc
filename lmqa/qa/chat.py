"""`lmqa chat`: question after question against one ingested document.

The document is prefilled once (or mapped from a context file); every answer
rolls the engine back to the document state, so questions never pollute the
document's block store and memory stays flat, unless the user turns /keep on
to hold a conversation. Ctrl-C stops the answer being written and keeps the
session (DocumentSession.ask rolls back on interruption); Ctrl-D leaves.

Input: prompt_toolkit (line editing, history in the lmqa cache) on an
interactive terminal; a plain line reader when stdin or stdout is not a
terminal or TERM is dumb, so pipes, pexpect and scripts see no escape sequences.

Ctrl-C is never lost. While the REPL runs, SIGINT does not raise at some
random bytecode: Python's C-level handler writes the signal number to a pipe
(signal.set_wakeup_fd) that the plain reader waits on together with stdin and
the answer loop polls after every token. A byte in a pipe, unlike a flag or a
pending KeyboardInterrupt, is still there for a read() that only begins after
the signal landed (input() would block on such a read until the next Enter).
Any KeyboardInterrupt that is raised anyway (prompt_toolkit's own Ctrl-C, a
signal in the moment the handler is not installed) ends the current cycle and
gives a fresh prompt.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lmqa.engine.generation import SamplingConfig, StreamDecoder
from .session import Answer, DocumentSession

PROMPT = "lmqa> "
HELP = """\
Type a question, or a command:
  /help          this text
  /blocks [N]    the last answer's N most retrieved blocks per layer, with sources
  /trace FILE    write the last answer's full retrieval trace as JSON
  /plot FILE     write the last answer's layers x blocks heatmap as PNG
  /topk N        retrieve N blocks per head and step from now on
  /keep on|off   keep the conversation (follow-up questions) or answer each question afresh
  /save FILE     save the document's context to FILE.lmqa (kept turns are not saved)
  /reset         drop kept turns: back to the document
  /exit          leave (also Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class ChatConfig:
    sampling: SamplingConfig
    show_blocks: int = 3  # default N of /blocks
    keep: bool = False
    history: Path | None = None  # prompt_toolkit history file


class SigintPipe:
    """SIGINT as a byte in a pipe instead of an exception (see the module
    docstring): arm() installs a do-nothing Python handler and points
    signal.set_wakeup_fd at the pipe; pending() says, and forgets, whether a
    SIGINT arrived since it was last asked; disarm() restores what was there.
    Only the main thread may install signal handlers: elsewhere arming does
    nothing and Ctrl-C keeps its default behaviour."""

    def __init__(self):
        self.read_fd, self._write_fd = os.pipe()
        for fd in (self.read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._saved: tuple | None = None

    def arm(self) -> bool:
        """Install (again: prompt_toolkit replaces both while it reads a line)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        handler = signal.signal(signal.SIGINT, _ignore_sigint)
        fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        if self._saved is None:
            self._saved = (handler, fd)
        return True

    def disarm(self) -> None:
        if self._saved is not None:
            handler, fd = self._saved
            signal.signal(signal.SIGINT, handler)
            signal.set_wakeup_fd(fd)
            self._saved = None

    def pending(self) -> bool:
        got = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 512)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        return signal.SIGINT in got


def _ignore_sigint(signum, frame) -> None:
    """The Python-level SIGINT handler while armed: the wakeup byte does the work."""


SIGINT_PIPE = SigintPipe()


class PlainLineReader:
    """input() for pipes and dumb terminals, except that Ctrl-C cannot be lost:
    it waits on stdin and the SIGINT pipe at once, so a Ctrl-C that landed
    before, while or after the prompt was written raises KeyboardInterrupt at
    once. EOFError at end of input (Ctrl-D on a terminal), as input() does."""

    def __init__(self, stdin_fd: int | None = None, out=None, sigint: SigintPipe = SIGINT_PIPE):
        self.fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self.out = out
        self.sigint = sigint
        self.encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        self._buf = b""

    def __call__(self, prompt: str) -> str:
        out = self.out or sys.stdout
        out.write(prompt)
        out.flush()
        if self.sigint.pending():
            raise KeyboardInterrupt
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self.fd, self.sigint.read_fd], [], [])
            if self.sigint.pending():
                raise KeyboardInterrupt
            if self.fd in ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    if not self._buf:
                        raise EOFError
                    break
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(self.encoding, errors="replace")


def line_reader(history: Path | None) -> Callable[[str], str]:
    """A function prompt -> line that raises EOFError on Ctrl-D and
    KeyboardInterrupt on Ctrl-C, as input() does."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    if not interactive:
        return PlainLineReader()
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    if history is not None:
        history.parent.mkdir(parents=True, exist_ok=True)
    prompt_session = PromptSession(history=FileHistory(str(history)) if history is not None else InMemoryHistory())
    return prompt_session.prompt


class Chat:
    """The REPL's state and commands; run() drives it from a line reader."""

    def __init__(self, session: DocumentSession, config: ChatConfig, console: Console, err: Console):
        self.session = session
        self.config = config
        self.console = console
        self.err = err
        self.last: Answer | None = None

    def run(self, read_line: Callable[[str], str]) -> None:
        self.note(f"{self.session.engine.n_tokens:,} tokens in {self.session.engine.n_blocks:,} blocks; "
                  "/help for commands, Ctrl-D to leave")
        try:
            while True:
                SIGINT_PIPE.arm()
                try:
                    if not self._cycle(read_line):
                        return
                except KeyboardInterrupt:  # at the prompt or in a command: a fresh prompt
                    self.console.print()
        finally:
            SIGINT_PIPE.disarm()

    def _cycle(self, read_line: Callable[[str], str]) -> bool:
        """Read one line and act on it; False means leave."""
        try:
            line = read_line(PROMPT).strip()
        except EOFError:
            self.console.print()
            return False
        SIGINT_PIPE.arm()  # prompt_toolkit restores Python's default handler when it returns
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        self.ask(line)
        return True

    # ----- questions -----
    def ask(self, question: str) -> None:
        decoder = StreamDecoder(self.session.loaded.tokenizer)

        def stream(t: int) -> None:
            if SIGINT_PIPE.pending():
                raise KeyboardInterrupt
            self.console.print(decoder.push(t), end="", soft_wrap=True, highlight=False, markup=False)

        try:
            answer = self.session.ask(question, self.config.sampling, on_token=stream, keep=self.config.keep)
        except KeyboardInterrupt:
            self.console.print()
            self.note("stopped; the session is as it was before the question")
            return
        self.console.print()
        self.last = answer
        self._evidence(answer)
        t = answer.timings
        self.note(f"first token after {t.first_token_s:.2f} s, {t.answer_tokens} tokens, {t.tokens_per_s:.1f} tok/s")

    # ----- commands -----
    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = self._commands().get(name)
        if handler is None:
            self.warn(f"unknown command {name}; /help lists them")
            return True
        return handler(arg) is not False

    def _commands(self) -> dict[str, Callable[[str], bool | None]]:
        return {"/help": lambda _: self.console.print(HELP, highlight=False, markup=False),
                "/blocks": self._blocks, "/trace": self._trace, "/plot": self._plot, "/topk": self._topk,
                "/keep": self._keep, "/save": self._save, "/reset": self._reset,
                "/exit": lambda _: False, "/quit": lambda _: False}

    def _need_answer(self) -> Answer | None:
        if self.last is None:
            self.warn("no answer yet: ask a question first")
        return self.last

    def _need_path(self, arg: str, command: str) -> Path | None:
        if not arg:
            self.warn(f"{command} needs a file name")
            return None
        path = Path(arg).expanduser()
        if not path.parent.is_dir():
            self.warn(f"{command} {arg}: directory {path.parent} does not exist")
            return None
        return path

    def _blocks(self, arg: str) -> None:
        from .retrieval_summary import summarize

        answer = self._need_answer()
        if answer is None:
            return
        top = self._int(arg, "/blocks") if arg else self.config.show_blocks
        if top:
            self.console.print(summarize(answer, top))

    def _evidence(self, answer: Answer) -> None:
        from .evidence import passages
        from .retrieval_summary import render_evidence

        self.console.print(render_evidence(passages(self.session, answer.evidence)))

    def _trace(self, arg: str) -> None:
        from .trace_export import trace, write_json

        answer, path = self._need_answer(), self._need_path(arg, "/trace")
        if answer is not None and path is not None:
            self._write(path, lambda p: write_json(p, trace(self.session, answer)), "trace")

    def _plot(self, arg: str) -> None:
        from .heatmap import plot

        answer, path = self._need_answer(), self._need_path(arg, "/plot")
        if answer is not None and path is not None:
            self._write(path, lambda p: plot(self.session, answer, p), "heatmap")

    def _save(self, arg: str) -> None:
        from .context_file import SUFFIX, save

        path = self._need_path(arg, "/save")
        if path is not None:
            path = path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)
            self._write(path, lambda p: save(self.session, p), "context")

    def _topk(self, arg: str) -> None:
        k = self._int(arg, "/topk")
        if k is None:
            return
        if k < 1:
            self.warn("/topk needs a number of at least 1")
            return
        s = self.session
        s.engine.set_top_k(k)
        s.loaded = replace(s.loaded, landmark=s.engine.config)
        self.note(f"top-k = {k}")

    def _keep(self, arg: str) -> None:
        if arg not in ("on", "off"):
            self.warn(f"/keep on|off (now {'on' if self.config.keep else 'off'})")
            return
        self.config.keep = arg == "on"
        if not self.config.keep:
            self.session.forget()
        self.note("keeping the conversation" if self.config.keep else "each question starts from the document again")

    def _reset(self, _: str) -> None:
        self.session.forget()
        self.note("back to the document state")

    # ----- helpers -----
    def _int(self, arg: str, command: str) -> int | None:
        try:
            return int(arg)
        except ValueError:
            self.warn(f"{command} needs a whole number, not {arg!r}")
            return None

    def _write(self, path: Path, write: Callable[[Path], object], what: str) -> None:
        try:
            write(path)
        except OSError as e:
            self.warn(f"{path}: could not write ({e.strerror or e})")
            return
        self.note(f"{what}: {path}")

    def note(self, text: str) -> None:
        self.err.print(f"[dim]{escape(text)}[/dim]", soft_wrap=True, highlight=False)

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]{escape(text)}[/yellow]", soft_wrap=True, highlight=False)
