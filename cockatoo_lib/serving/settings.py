"""The model server's settings: its port, limits and batching. Light to import: the command
line builds its options from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.limits import MAX_IMAGE_PIXELS

DEFAULT_HTTP_PORT = 8080  # KServe's


def option(name: str, switch: bool = False) -> str:
    """A setting's command-line option: --max-batch-size; for a switch, --reduced-forms/--no-reduced-forms."""
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if switch else flag


class ServeSettings(BaseModel):
    """The server's limits and batching; `cockatoo serve --help` and the README list them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=32, ge=1, le=1024,
                                description="instances scored together, at most")
    max_batch_tokens: int = Field(default=512, ge=16, le=1_000_000,
                                  description="a batch is scored in parts of at most this many tokens, "
                                              "padding included (B11: 512 is fastest on a CPU; raise it "
                                              "on a GPU)")
    max_batch_wait_ms: float = Field(default=0.0, ge=0, le=1000,
                                     description="how long a batch waits for more requests once the queue "
                                                 "is empty (0: requests that arrive while a batch is "
                                                 "scored make the next one)")
    max_concurrent_requests: int = Field(default=64, ge=1, le=100_000,
                                         description="predict requests in progress at once, at most; "
                                                     "past it a request is a 503 with Retry-After "
                                                     "(deploy sets the InferenceService's "
                                                     "containerConcurrency to it)")
    max_instances: int = Field(default=64, ge=1, le=4096, description="instances in one request, at most")
    max_text_chars: int = Field(default=20_000, ge=1, le=1_000_000,
                                description="characters of one text, at most (the model reads its "
                                            "first max_length tokens)")
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024, le=2**30,
                                description="bytes of one request body, at most (base64 images included)")
    image_url_hosts: str = Field(
        default="", max_length=4096,
        description="hosts whose http(s) image URLs the server fetches, comma-separated: a name, "
                    "*.example.com for a domain, * for any public host (only a host named exactly may "
                    "be at a private, loopback or link-local address); empty: images inline as base64 only")
    image_fetch_timeout_s: float = Field(default=5.0, gt=0, le=120,
                                         description="how long an image URL's whole download may take")
    max_image_bytes: int = Field(default=8 * 2**20, ge=1024, le=2**30,
                                 description="bytes of one image, at most (inline or fetched)")
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, ge=1, le=MAX_IMAGE_PIXELS,
                                  description="pixels of one image (width x height, read from its header "
                                              "before it is decoded), at most")
    reduced_forms: bool = Field(default=True,
                                description="on a CPU, serve a registry version in a reduced form its "
                                            "gate accepted (test macro-F1 down by at most 0.005): bf16 "
                                            "where the CPU has bf16 instructions, else int8 (B11); "
                                            "--no-reduced-forms: always as trained")
    poll_interval_s: float = Field(default=30.0, gt=0, le=86_400,
                                   description="how often the registry is asked where the alias points")

    def args(self) -> list[str]:
        """The options that give these settings to `cockatoo serve`, defaults left out."""
        out = []
        for name, value in self.model_dump(exclude_defaults=True).items():
            if isinstance(value, bool):
                out.append(option(name, switch=True).split("/")[0 if value else 1])
            else:
                out += [option(name), str(value)]
        return out

    @classmethod
    def of(cls, **values) -> ServeSettings:
        """The settings, or one line naming the option that is out of range."""
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = "--" + str(error["loc"][0]).replace("_", "-")
            raise CockatooError(f"{name} {values.get(error['loc'][0])!r}: {error['msg'].lower()}") from None
