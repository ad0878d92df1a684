"""Settings from the environment and `.env` files, read once at start and validated.

Two `.env` files are read, if present: the current folder's, then the persona folder's (which
wins); real environment variables win over both. An unreadable line is an error naming the file
and the line. Tokens, passwords and keys are `SecretStr`: they never print, not even in a
traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from dotenv.parser import parse_stream
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.recall import GROUNDED_CANDIDATES, GROUNDED_MIN, FactAnswers, RecallAnswers
from bot.serve import PlatformSettings, SettingsError

# What a secret may look like, and the line that says so (never the value). The libraries paste
# tokens into URL paths and headers: a "/", "?", "#" or space would reach another endpoint (PTB
# then fails with a JSONDecodeError) instead of being refused.
_SHAPES = {
    "telegram_webhook_secret": (
        r"[A-Za-z0-9_-]{1,256}", "TELEGRAM_WEBHOOK_SECRET may hold only A-Z, a-z, 0-9, _ and - (1-256)"),
    "telegram_token": (
        r"\d+:[A-Za-z0-9_-]+", "TELEGRAM_TOKEN must be the token @BotFather gives, like 123456789:AAH4x-y_Z "
        "(digits, a colon, then letters, digits, _ and -), without quotes or spaces"),
    "discord_token": (
        r"[A-Za-z0-9_.-]+", "DISCORD_TOKEN must be the bot's token alone (letters, digits, '.', '_' "
        "and '-'), without a 'Bot ' prefix, quotes or spaces"),
    # It travels in an Authorization header and is typed into a login form: no spaces, and long
    # enough that guessing it (a second per wrong try) is hopeless.
    "clone_console_token": (
        r"[\x21-\x7e]{16,512}", "CLONE_CONSOLE_TOKEN must be 16 or more printable ASCII characters without "
        "spaces (unset, `clone console` makes one and prints it once)"),
}


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class Settings(BaseSettings):
    """Every setting a `clone` command reads. Names are the environment variables' (any case)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True,
        case_sensitive=False, validate_default=True,
    )

    # Which persona, and where persona folders live.
    clone_persona: str | None = Field(None, description="persona folder or name")
    clone_personas: Path | None = Field(None, description="folder of persona folders")
    clone_cache: Path | None = Field(None, description="converted base models")
    clone_memory_file: Path | None = Field(None, description="embedded memory file")
    clone_adapter_check_s: float = Field(10.0, gt=0, description="how often serve checks `active`")
    clone_typing_delay: bool = Field(True, description="pace the terminal chat like a person")
    clone_recall: bool = Field(True, description="recall knowledge, past replies and users' words")
    clone_longterm_days: float = Field(90.0, gt=0, description="days a user's words are remembered")
    clone_longterm_items: int = Field(500, ge=1, description="words remembered per user and platform")
    # A message this similar to a knowledge-base question gets the person's own written answer;
    # `off` generates every reply. 0.7 fired on 0.84% of the sample's ordinary incoming messages.
    clone_fact_answer_min: float | None = Field(FactAnswers.min_similarity, gt=0, le=1,
                                                description="fact answer threshold")
    # A user asking about themselves this close to something they said gets their words told back.
    clone_recall_answer_min: float | None = Field(RecallAnswers.min_similarity, gt=0, le=1,
                                                  description="recall answer threshold")
    # A question this similar to a recalled knowledge item is answered by grounded decoding: the
    # reply weighed against what the clone would say without its recalled items.
    clone_grounded_min: float | None = Field(GROUNDED_MIN, gt=0, le=1, description="grounded decoding from")
    # Grounded replies sampled at once; the one nearest in meaning to the knowledge is sent.
    clone_grounded_candidates: int = Field(GROUNDED_CANDIDATES, ge=1, le=8, description="grounded samples")
    # Well under the platforms' SIGKILL (Fly 5 s by default, Heroku 30 s): what is not answered by
    # then is left to the next process.
    clone_stop_grace_s: float = Field(8.0, ge=0, le=300, description="SIGTERM: time to finish replies")
    # Memory and generation.
    redis_url: SecretStr | None = None
    llm_base_url: str | None = None
    llm_model: str = "clone"
    llm_api_key: SecretStr | None = None
    clone_api_key: SecretStr | None = None  # the key `clone serve-model` requires of its callers
    clone_console_token: SecretStr | None = None  # what `clone console` requires (else it makes one)
    # Platforms.
    telegram_token: SecretStr | None = None
    telegram_base_url: str | None = None
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: SecretStr | None = None
    port: int = 8080
    discord_token: SecretStr | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None

    @field_validator("clone_personas", "clone_cache", "clone_memory_file")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("clone_fact_answer_min", "clone_recall_answer_min", "clone_grounded_min", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return None if str(value).strip().casefold() in ("off", "none", "false") else value

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: object) -> int:
        text = str(value).strip()
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"PORT must be a port number (1-65535), not {text!r}")
        return int(text)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return value

    @field_validator(*_SHAPES)
    @classmethod
    def _shape(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        shape, message = _SHAPES[str(info.field_name)]
        if value is not None and not re.fullmatch(shape, value.get_secret_value()):
            raise ValueError(message)
        return value

    @model_validator(mode="after")
    def _webhook_url(self) -> Settings:
        url = self.telegram_webhook_url
        if url is not None:
            parsed = urlsplit(url)
            # Telegram itself only calls https; a self-hosted Bot API server (--local) may call http.
            schemes = ("https", "http") if self.telegram_base_url else ("https",)
            if parsed.scheme not in schemes or not parsed.netloc:
                raise ValueError(
                    f"TELEGRAM_WEBHOOK_URL must be a public {' or '.join(schemes)} URL, like "
                    "https://my-clone.fly.dev/telegram"
                )
        return self

    # Plain values for the layers below, which never see a SecretStr.
    def secret(self, name: str) -> str | None:
        return _secret(getattr(self, name))

    def platforms(self) -> PlatformSettings:
        return PlatformSettings(
            self.secret("telegram_token"), self.telegram_base_url, self.secret("discord_token"),
            self.discord_api_base, self.discord_gateway_url, self.telegram_webhook_url, self.port,
            self.secret("telegram_webhook_secret"), stop_grace_s=self.clone_stop_grace_s)


def check_env_file(path: Path) -> None:
    """One clear line for a line python-dotenv would skip with only a warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot be read ({e.strerror})") from None
    for binding in parse_stream(_Lines(text)):
        if binding.error:
            raise SettingsError(f"{path}, line {binding.original.line}: expected KEY=VALUE")


class _Lines:
    """The minimal stream python-dotenv's parser reads."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


def load_settings(*env_files: Path | None) -> Settings:
    """Settings from the environment and the given `.env` files (later files win; missing ones
    are passed over). Raises SettingsError with one line naming the setting."""
    files = [p for p in env_files if p is not None and p.is_file()]
    for path in files:
        check_env_file(path)
    try:
        return Settings(_env_file=tuple(files) or None)  # type: ignore[call-arg]
    except ValidationError as e:
        raise SettingsError(_one_line(e)) from None


def _one_line(error: ValidationError) -> str:
    """The first problem, named by its environment variable; never the value of a secret."""
    first = error.errors(include_input=False, include_url=False)[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a check across settings: its message names them
        return message
    name = str(first["loc"][0]).upper()
    return message if message.startswith(name) else f"{name}: {message}"
