"""What both providers' native models share: strict parsing, paths in errors, image checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers import images
from worker.providers.rules import PayloadRules, Provider

T = TypeVar("T")


class Native(BaseModel):
    """A provider shape: unknown fields refused, no type coercion, extension fields excluded
    from dumps so `sdk()` is exactly what the provider's SDK takes."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def sdk(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


def pin_field() -> Any:
    """The per-message `pin` extension: never dropped when fitting; never sent."""
    return Field(default=False, exclude=True)


def declared_size() -> Any:
    """Declared pixel size of an image given by URL (tokenheap never fetches); never sent."""
    return Field(default=None, exclude=True, gt=0)


def path_of(root: str, loc: Sequence[int | str]) -> str:
    out = root
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse(adapter: TypeAdapter[T], raw: Any, root: str) -> T:
    """Validate `raw`; a failure becomes an `InvalidRequest` naming the part's path.

    Of a union's failures the deepest is reported: it is the branch the input meant to take.
    """
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        best = max(errors, key=lambda e: len(_input_path(raw, e["loc"])))
        loc = _input_path(raw, best["loc"])
        raise InvalidRequest(f"{path_of(root, loc)}: {best['msg']}") from None


def _input_path(raw: Any, loc: Sequence[int | str]) -> list[int | str]:
    """Keep the parts of a pydantic location that exist in the input; drop the union tags it
    inserts ('user', 'str', 'list[...]'). A missing field's name (the last part) is kept."""
    out: list[int | str] = []
    node = raw
    for k, part in enumerate(loc):
        in_list = isinstance(part, int) and isinstance(node, list) and part < len(node)
        if in_list or (isinstance(part, str) and isinstance(node, dict) and part in node):
            node = node[part]
            out.append(part)
        elif k == len(loc) - 1 and isinstance(node, dict) and isinstance(part, str):
            out.append(part)
    return out


class ImageCheck:
    """Counts images across one request and checks each against the provider's limits."""

    def __init__(self, provider: Provider, model: str, rules: PayloadRules) -> None:
        self.provider, self.model, self.rules = provider, model, rules
        self.limits = rules.image_limits[provider]
        self.seen = 0
        self.total_bytes = 0
        self.sizes: dict[str, images.ImageSize] = {}
        """Sizes read so far, by path, so costing need not decode the same bytes again."""

    def base64(self, data: str, media_type: str | None, path: str) -> images.ImageSize:
        cap = self.limits.max_image_bytes
        raw = self._bytes(lambda: images.decode_base64(data, max_bytes=cap), path)
        return self._size(raw, media_type, path)

    def data_url(self, url: str, path: str) -> images.ImageSize:
        cap = self.limits.max_image_bytes
        media_type, raw = self._bytes(lambda: images.parse_data_url(url, max_bytes=cap), path)
        return self._size(raw, media_type, path)

    def declared(self, width: int | None, height: int | None, path: str) -> None:
        self._count(path)
        if width is not None and height is not None:
            self._pixels(width, height, path)

    def _bytes(self, fn: Callable[[], T], path: str) -> T:
        self._count(path)
        try:
            return fn()
        except (InvalidRequest, RequestTooLarge) as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def _total(self, raw: bytes, path: str) -> None:
        self.total_bytes += len(raw)
        cap = self.limits.max_request_image_bytes
        if self.total_bytes > cap:
            raise RequestTooLarge(f"{path}: images in this request exceed {cap} bytes together")

    def _count(self, path: str) -> None:
        family = self.rules.image_family(self.provider, self.model)
        if not family.vision:
            raise InvalidRequest(f"{path}: model {self.model!r} does not take images")
        self.seen += 1
        if self.seen > self.limits.max_images:
            raise RequestTooLarge(f"{path}: over {self.limits.max_images} images in one request")

    def _size(self, raw: bytes, media_type: str | None, path: str) -> images.ImageSize:
        self._total(raw, path)
        try:
            size = images.image_size(raw)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{path}: {exc}") from None
        if media_type is not None and media_type != size.media_type:
            raise InvalidRequest(
                f"{path}: declared {media_type} but the bytes are {size.media_type}"
            )
        self._pixels(size.width, size.height, path)
        self.sizes[path] = size
        return size

    def _pixels(self, width: int, height: int, path: str) -> None:
        cap = self.limits.max_edge_px
        many, many_cap = self.limits.many_images, self.limits.many_images_max_edge_px
        if many is not None and many_cap is not None and self.seen > many:
            cap = many_cap
        if cap is not None and max(width, height) > cap:
            raise RequestTooLarge(f"{path}: image is {width}x{height}, over the {cap} px limit")
