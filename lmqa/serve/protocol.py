"""The OpenAI chat-completions shapes lmqa serves: the request it reads, the
errors, completions and stream chunks it writes. Only what a question about
one context needs is read; other fields a client sends (n, tools, ...) are
ignored, as OpenAI-compatible servers commonly do."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


class _Part(BaseModel):
    type: str
    text: str = ""


class Message(BaseModel):
    role: str
    content: str | list[_Part] | None = None

    def text(self) -> str:
        """The message's text; of a list of parts, the text parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None

    @classmethod
    def parse(cls, raw: bytes) -> ChatRequest:
        """The request in a body, or ApiError 400 (not JSON, or not a chat request)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] in ("json_invalid", "json_type"):
                raise ApiError(400, f"the request body is not valid JSON: {first['msg']}", "invalid_json") from None
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", "invalid_request") from None

    def question(self) -> str:
        """The last user message: each request is one question about the
        context (earlier turns are not fed; `lmqa chat` keeps turns)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise ApiError(400, "messages hold no user message: the last one is the question", "no_question")


class Completion:
    """One answer's identity, shared by its response or all of its chunks."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def response(self, text: str, finish: str, usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage, **extra}

    def chunk(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def usage(question_tokens: int, answer_tokens: int) -> dict[str, int]:
    """Prompt tokens are the question's (the context was read once, at ingest)."""
    return {"prompt_tokens": question_tokens, "completion_tokens": answer_tokens,
            "total_tokens": question_tokens + answer_tokens}
