"""What an annotation says about an item: objects with shapes, classifications, relationships.

Shared by annotations, gold answers and review corrections, so the three compare like for like.
Coordinates are pixels, origin top-left, y down (see docs/metrics.md); adapters convert tool
formats (Label Studio percentages, CVAT rotations) before anything reaches these models.

Coordinates are bounded (docs/messages.md, "Bounds"): every vertex, corner and point lies within
one image size of the item's image (of the largest image, 1,000,000 px, when the item declares no
size), and a mask is the image's size. A finite but absurd number (1e308) is a message error,
named by field, rather than an overflow in scoring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

from goldstream.schemas.base import Id, Label, Model, limits_of
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_IMAGE_SIDE = 1_000_000
"""The largest image width or height an item may declare, in pixels."""

MARGIN = 1.0
"""k: how far, in image sizes, a shape may reach beyond each edge of its image. Tools let
annotators drag a little past the border (and scoring clips regions to the image), so the bound
is generous; it exists so that a coordinate like 1e308 is an error in the message, not a numpy
overflow in scoring."""

COORD_MIN = -MARGIN * MAX_IMAGE_SIDE
COORD_MAX = (1 + MARGIN) * MAX_IMAGE_SIDE
SIZE_MAX = COORD_MAX - COORD_MIN
MAX_MASK_PIXELS = 1 << 27
"""height x width of a mask (134 Mpx, 11585 x 11585): a polygon compared with a mask is rasterised
at the mask's size, so the size bounds the memory and time one message can cost."""

Coord = Annotated[float, Field(ge=COORD_MIN, le=COORD_MAX)]
NonNeg = Annotated[float, Field(ge=0, le=SIZE_MAX)]
Area = Annotated[float, Field(ge=0, le=SIZE_MAX * SIZE_MAX)]
XY = tuple[Coord, Coord]
Visibility = Literal[0, 1, 2]
XYV = tuple[Coord, Coord, Visibility]


def _within(count: int, limit: int, what: str) -> None:
    """Reject a count over a configured size limit (schemas.base.Limits)."""
    if count > limit:
        raise ValueError(f"{count} {what}, over the limit of {limit}")


def _check_vertices(points: list, info: ValidationInfo, minimum: int, what: str) -> list:
    _within(len(points), limits_of(info).max_vertices, f"vertices in a {what}")
    if len(points) < minimum:
        raise ValueError(f"{what} needs at least {minimum} points, got {len(points)}")
    return points


class BBox(Model):
    """Axis-aligned box `[x, y, w, h]` as in COCO: top-left corner, width, height."""

    type: Literal["bbox"] = "bbox"
    x: Coord
    y: Coord
    w: NonNeg
    h: NonNeg


class RotatedBBox(Model):
    """Box rotated by `angle` degrees clockwise on screen about its centre."""

    type: Literal["rotated_bbox"] = "rotated_bbox"
    cx: Coord
    cy: Coord
    w: NonNeg
    h: NonNeg
    angle: Annotated[float, Field(ge=-360, le=360, description="degrees, clockwise on screen")]


class Polygon(Model):
    """A region: one outer ring and optional holes, each ring at least 3 (x, y) vertices."""

    type: Literal["polygon"] = "polygon"
    points: list[XY]
    holes: list[list[XY]] = Field(default_factory=list)

    @field_validator("points")
    @classmethod
    def _ring(cls, v: list[XY], info: ValidationInfo) -> list[XY]:
        return _check_vertices(v, info, 3, "polygon")

    @field_validator("holes")
    @classmethod
    def _holes(cls, v: list[list[XY]], info: ValidationInfo) -> list[list[XY]]:
        for ring in v:
            _check_vertices(ring, info, 3, "polygon hole")
        return v


class Polyline(Model):
    """An open line of at least 2 vertices (lanes, edges, skeletons drawn as lines)."""

    type: Literal["polyline"] = "polyline"
    points: list[XY]

    @field_validator("points")
    @classmethod
    def _line(cls, v: list[XY], info: ValidationInfo) -> list[XY]:
        return _check_vertices(v, info, 2, "polyline")


class Point(Model):
    """A single point."""

    type: Literal["point"] = "point"
    x: Coord
    y: Coord


class Keypoints(Model):
    """A keypoint set `(x, y, v)` in the order of a keypoint schema named in the project.

    v: 0 not labeled, 1 labeled but occluded, 2 visible (COCO). `area` (segment area) or `bbox`
    give the object scale OKS needs; the gold side's scale is the one used.
    """

    type: Literal["keypoints"] = "keypoints"
    points: list[XYV]
    schema_name: Annotated[str | None, Field(alias="schema", max_length=128)] = None
    area: Area | None = None
    bbox: tuple[Coord, Coord, NonNeg, NonNeg] | None = None

    model_config = Model.model_config | {"populate_by_name": True, "serialize_by_alias": True}

    @field_validator("points")
    @classmethod
    def _count(cls, v: list[XYV], info: ValidationInfo) -> list[XYV]:
        _within(len(v), limits_of(info).max_keypoints, "keypoints")
        if not v:
            raise ValueError("a keypoint set needs at least one keypoint")
        return v


class Mask(Model):
    """A COCO run-length encoded mask: `size` is [height, width]; `counts` compressed or not."""

    type: Literal["mask"] = "mask"
    size: tuple[Annotated[int, Field(gt=0, le=100_000)], Annotated[int, Field(gt=0, le=100_000)]]
    counts: str | list[Annotated[int, Field(ge=0)]]

    @model_validator(mode="after")
    def _counts_fit(self) -> Mask:
        h, w = self.size
        if h * w > MAX_MASK_PIXELS:
            raise ValueError(f"a {h} x {w} mask has {h * w} pixels, over the limit of {MAX_MASK_PIXELS}")
        if isinstance(self.counts, list):
            total = sum(self.counts)
            if total != h * w:
                raise ValueError(f"uncompressed RLE counts sum to {total}, expected h*w = {h * w}")
        elif self.counts and any(not 48 <= ord(c) < 48 + 64 for c in self.counts):
            raise ValueError("compressed RLE counts contain characters outside COCO's alphabet")
        return self


Shape = Annotated[
    BBox | RotatedBBox | Polygon | Polyline | Point | Keypoints | Mask,
    Field(discriminator="type"),
]

ShapeType = Literal["bbox", "rotated_bbox", "polygon", "polyline", "point", "keypoints", "mask"]
SHAPE_TYPES: tuple[str, ...] = ShapeType.__args__  # type: ignore[attr-defined]

AttributeValue = bool | int | float | str | list[str]


class AnnotatedObject(Model):
    """One object an annotator drew: a label, one shape, its attributes."""

    id: Id = Field(description="Unique within the annotation; relationships refer to it.")
    label: Label
    shape: Shape
    attributes: dict[Label, AttributeValue] = Field(default_factory=dict)
    iscrowd: bool = Field(False, description="COCO crowd region (only meaningful on gold).")
    confidence: Annotated[float, Field(ge=0, le=1)] | None = None


class Relationship(Model):
    """A (subject, predicate, object) triple between two objects of the same annotation."""

    subject: Id
    predicate: Label
    object: Id


class ImageSize(Model):
    """Pixel size of the item, used to clip regions and convert tool percentages."""

    width: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
    height: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]


class Content(Model):
    """The answer for one item, from an annotator, a gold set or a reviewer."""

    objects: list[AnnotatedObject] = Field(default_factory=list)
    classifications: dict[Label, list[Label]] = Field(
        default_factory=dict,
        description="taxonomy name -> chosen labels (one for single-label taxonomies)",
    )
    relationships: list[Relationship] = Field(default_factory=list)
    image: ImageSize | None = None

    @field_validator("objects")
    @classmethod
    def _object_limit(cls, v: list[AnnotatedObject], info: ValidationInfo) -> list[AnnotatedObject]:
        _within(len(v), limits_of(info).max_objects, "objects")
        return v

    @model_validator(mode="after")
    def _references(self) -> Content:
        ids = [o.id for o in self.objects]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"object id {i!r} appears more than once")
            seen.add(i)
        for n, rel in enumerate(self.relationships):
            for end in (rel.subject, rel.object):
                if end not in seen:
                    raise ValueError(f"relationships.{n} refers to unknown object id {end!r}")
        return self

    @model_validator(mode="after")
    def _within_image(self) -> Content:
        """Every vertex, corner and point lies within MARGIN image sizes of the image.

        The window is [-k W, (1 + k) W] x [-k H, (1 + k) H] for the item's image W x H, or for the
        largest image (MAX_IMAGE_SIDE) when the item declares none; a mask must be the image's size.
        """
        width, height = (self.image.width, self.image.height) if self.image else (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
        x0, x1 = -MARGIN * width, (1 + MARGIN) * width
        y0, y1 = -MARGIN * height, (1 + MARGIN) * height
        for n, obj in enumerate(self.objects):
            shape = obj.shape
            if isinstance(shape, Mask):
                if self.image is not None and tuple(shape.size) != (height, width):
                    raise _outside(
                        f"objects.{n}.shape: mask size [{shape.size[0]}, {shape.size[1]}] is not the image's "
                        f"[height, width] [{height}, {width}]"
                    )
                continue
            if isinstance(shape, BBox):
                # the common case, decided without naming corners (w and h are not negative)
                if x0 <= shape.x and shape.x + shape.w <= x1 and y0 <= shape.y and shape.y + shape.h <= y1:
                    continue
            elif isinstance(shape, Keypoints) and shape.area is not None and shape.area > (x1 - x0) * (y1 - y0):
                raise _outside(f"objects.{n}.shape.area {shape.area:g} is larger than the image's window")
            if isinstance(shape, Polygon | Polyline):
                # vertices by the thousand: bound them in C first, name the offender only if needed
                rings = [shape.points, *shape.holes] if isinstance(shape, Polygon) else [shape.points]
                xs, ys = zip(*(xy for ring in rings for xy in ring), strict=True)
                if x0 <= min(xs) and max(xs) <= x1 and y0 <= min(ys) and max(ys) <= y1:
                    continue
            for what, x, y in _extent(shape):
                if not (x0 <= x <= x1 and y0 <= y <= y1):
                    raise _outside(
                        f"objects.{n}.shape: {what} ({x:g}, {y:g}) is outside the image's window "
                        f"[{x0:g}, {x1:g}] x [{y0:g}, {y1:g}] ({MARGIN:g} image size beyond each edge)"
                    )
        return self


def _outside(detail: str) -> PydanticCustomError:
    """An error of type `outside_image`, so dead letters can tell it from other value errors."""
    return PydanticCustomError("outside_image", "{detail}", {"detail": detail})


def _extent(shape: BBox | RotatedBBox | Polygon | Polyline | Point | Keypoints) -> Iterator[tuple[str, float, float]]:
    """The points that bound a shape (named for error messages): its vertices, corners or points."""
    if isinstance(shape, BBox):
        yield "top-left corner", shape.x, shape.y
        yield "bottom-right corner", shape.x + shape.w, shape.y + shape.h
    elif isinstance(shape, RotatedBBox):
        t = math.radians(shape.angle)
        cos, sin = math.cos(t), math.sin(t)
        for i, (dx, dy) in enumerate(((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))):
            lx, ly = dx * shape.w, dy * shape.h
            yield f"corner {i}", lx * cos - ly * sin + shape.cx, lx * sin + ly * cos + shape.cy
    elif isinstance(shape, Polygon):
        for i, (x, y) in enumerate(shape.points):
            yield f"vertex {i}", x, y
        for h, ring in enumerate(shape.holes):
            for i, (x, y) in enumerate(ring):
                yield f"hole {h} vertex {i}", x, y
    elif isinstance(shape, Polyline):
        for i, (x, y) in enumerate(shape.points):
            yield f"vertex {i}", x, y
    elif isinstance(shape, Point):
        yield "point", shape.x, shape.y
    elif isinstance(shape, Keypoints):
        for i, (x, y, _) in enumerate(shape.points):
            yield f"keypoint {i}", x, y
        if shape.bbox is not None:
            bx, by, bw, bh = shape.bbox
            yield "bbox top-left corner", bx, by
            yield "bbox bottom-right corner", bx + bw, by + bh
