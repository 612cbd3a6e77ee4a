"""One street scene: sample a layout from the domain's label distribution, draw it, apply the domain's look.

`render_scene(rng, scene, domain)` is a pure function of the generator state: one seed, the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from training.data.synth import objects
from training.data.synth.appearance import apply_style, sky_gradient
from training.data.synth.canvas import EGO, C, Camera, Canvas, jitter, shade
from training.data.synth.config import DomainConfig, LabelDistributionConfig, SceneConfig


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _depth(rng: np.random.Generator, lab: LabelDistributionConfig, near: float | None = None) -> float:
    """Log-uniform depth: as many objects per octave of distance, as on a real street."""
    lo = lab.near_depth if near is None else near
    hi = max(lab.far_depth, lo + 1.0)
    return float(lo * (hi / lo) ** rng.uniform())


def _side_segments(
    rng: np.random.Generator, lab: LabelDistributionConfig, max_depth: float
) -> list[tuple[float, float, str]]:
    segments = []
    z = float(rng.uniform(0.5, 6.0))
    while z < max_depth:
        if rng.uniform() < lab.building_prob:
            length = float(rng.uniform(8.0, 35.0))
            kind = "building"
        else:
            length = float(rng.uniform(4.0, 18.0))
            kind = "vegetation" if rng.uniform() < lab.vegetation_prob else "open"
        segments.append((z, min(z + length, max_depth), kind))
        z += length
    return segments


def _cut(segments: list[tuple[float, float, str]], a: float, b: float) -> list[tuple[float, float, str]]:
    """Remove the depth range [a, b] from the side segments (where a side street crosses)."""
    out = []
    for z0, z1, kind in segments:
        if z1 <= a or z0 >= b:
            out.append((z0, z1, kind))
            continue
        if a - z0 > 1.0:
            out.append((z0, a, kind))
        if z1 - b > 1.0:
            out.append((b, z1, kind))
    return out


def render_scene(
    rng: np.random.Generator, scene: SceneConfig, domain: DomainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (H, W, 3) uint8 RGB and (H, W) uint8 train ids (255-free; the ego bonnet is `canvas.EGO`)."""
    h, w = scene.height, scene.width
    style, lab = domain.style, domain.labels
    cam = Camera(
        focal=_uniform(rng, scene.focal) * w,
        height=_uniform(rng, scene.camera_height),
        cx=w * float(rng.uniform(0.42, 0.58)),
        horizon=h * _uniform(rng, scene.horizon),
    )
    cv = Canvas(sky_gradient(rng, h, w, style), C["sky"])
    far = scene.max_depth
    near = 0.3

    # street cross-section (x in metres, camera at x = 0 in one of the lanes)
    lanes = int(rng.integers(scene.lanes[0], scene.lanes[1] + 1))
    road_w = lanes * scene.lane_width
    ego_lane = int(rng.integers(lanes))
    x_left = -(ego_lane + 0.5) * scene.lane_width + float(rng.normal(0, 0.3))
    x_right = x_left + road_w
    walk = (_uniform(rng, scene.sidewalk_width), _uniform(rng, scene.sidewalk_width))
    setback = (_uniform(rng, scene.setback), _uniform(rng, scene.setback))
    curb = {-1: x_left, 1: x_right}
    outer = {-1: x_left - walk[0], 1: x_right + walk[1]}
    front = {-1: outer[-1] - setback[0], 1: outer[1] + setback[1]}

    # skyline at the end of the street
    for _ in range(int(rng.integers(4, 10))):
        zc = far * rng.uniform(0.9, 1.3)
        xa = rng.uniform(-60, 60)
        hb = rng.uniform(8, 40)
        kind = "building" if rng.uniform() < 0.7 else "vegetation"
        base = (
            style.building_colors[int(rng.integers(len(style.building_colors)))]
            if kind == "building"
            else style.class_colors[C["vegetation"]]
        )
        col = jitter(rng, base, style.color_jitter, 0.85)
        cv.polygon(
            cam.points(
                [
                    (xa, 0, zc),
                    (xa, hb, zc),
                    (xa + rng.uniform(10, 40), hb, zc),
                    (xa + rng.uniform(10, 40), 0, zc),
                ]
            ),
            C[kind],
            col,
        )

    # ground: terrain everywhere, then sidewalks and the road
    ground = jitter(rng, style.class_colors[C["terrain"]], style.color_jitter)
    cv.polygon(
        [(-10, cam.horizon), (w + 10, cam.horizon), (w + 10, h + 10), (-10, h + 10)], C["terrain"], ground
    )
    walk_col = jitter(rng, style.class_colors[C["sidewalk"]], style.color_jitter)
    road_col = jitter(rng, style.class_colors[C["road"]], style.color_jitter * 0.5)
    segments = {s: _side_segments(rng, lab, far) for s in (-1, 1)}
    cross: tuple[float, float] | None = None
    if rng.uniform() < scene.cross_street_prob:
        za = float(rng.uniform(12.0, 45.0))
        cross = (za, za + float(rng.uniform(8.0, 14.0)))
        # the corners stay open: 3 m of pavement on each side of the side street
        segments = {s: _cut(segs, cross[0] - 3.0, cross[1] + 3.0) for s, segs in segments.items()}
    for s in (-1, 1):
        cv.polygon(
            cam.points([(curb[s], 0, near), (outer[s], 0, near), (outer[s], 0, far), (curb[s], 0, far)]),
            C["sidewalk"],
            walk_col,
        )
        for z0, z1, _kind in segments[s]:
            if abs(front[s] - outer[s]) < 0.3:
                continue
            cls = C["terrain"] if rng.uniform() < lab.terrain_prob else C["sidewalk"]
            col = ground if cls == C["terrain"] else shade(walk_col, 0.92)
            cv.polygon(
                cam.points(
                    [
                        (outer[s], 0, max(z0, near)),
                        (front[s], 0, max(z0, near)),
                        (front[s], 0, z1),
                        (outer[s], 0, z1),
                    ]
                ),
                cls,
                col,
            )
        # curb stone, part of the sidewalk
        cv.paint(
            cam.points(
                [
                    (curb[s], 0, near),
                    (curb[s] + s * 0.15, 0, near),
                    (curb[s] + s * 0.15, 0, far),
                    (curb[s], 0, far),
                ]
            ),
            shade(walk_col, 1.2),
        )
        # sidewalk tiles: joints across the walk
        for zz in np.arange(2.0, 40.0, 1.5):
            cv.paint_line(cam.points([(curb[s], 0, zz), (outer[s], 0, zz)]), shade(walk_col, 0.85), 1)
    cv.polygon(
        cam.points([(x_left, 0, near), (x_right, 0, near), (x_right, 0, far), (x_left, 0, far)]),
        C["road"],
        road_col,
    )
    if cross is not None:
        za, zb = cross
        for z0, z1 in ((za - 3.0, za), (zb, zb + 3.0)):  # corner pavements along the side street
            for s in (-1, 1):
                cv.polygon(
                    cam.points(
                        [
                            (curb[s], 0, z0),
                            (curb[s] + s * 300, 0, z0),
                            (curb[s] + s * 300, 0, z1),
                            (curb[s], 0, z1),
                        ]
                    ),
                    C["sidewalk"],
                    walk_col,
                )
        cv.polygon(
            cam.points([(-300.0, 0, za), (300.0, 0, za), (300.0, 0, zb), (-300.0, 0, zb)]),
            C["road"],
            road_col,
        )
    marking = jitter(rng, (225, 225, 215), 8.0, 0.9)
    dash = float(rng.uniform(2.0, 4.0))
    for k in range(1, lanes):
        xl = x_left + k * scene.lane_width
        solid = rng.uniform() < 0.25
        for zz in np.arange(near + rng.uniform(0, dash), far, dash * (1 if solid else 2.5)):
            zb = zz + dash
            cv.paint(
                cam.points([(xl - 0.07, 0, zz), (xl + 0.07, 0, zz), (xl + 0.07, 0, zb), (xl - 0.07, 0, zb)]),
                marking,
            )
    for s in (-1, 1):
        xe = curb[s] - s * 0.35
        cv.paint(
            cam.points(
                [(xe - 0.06, 0, near), (xe + 0.06, 0, near), (xe + 0.06, 0, far), (xe - 0.06, 0, far)]
            ),
            marking,
        )
    if rng.uniform() < 0.3:  # crosswalk
        zc = float(rng.uniform(8.0, 30.0))
        for xs in np.arange(x_left + 0.3, x_right - 0.3, 1.0):
            cv.paint(
                cam.points([(xs, 0, zc), (xs + 0.5, 0, zc), (xs + 0.5, 0, zc + 3.0), (xs, 0, zc + 3.0)]),
                marking,
            )
    # road patches and wear, colour only
    for _ in range(int(rng.integers(0, 4))):
        zc, xc = float(rng.uniform(5.0, 40.0)), float(rng.uniform(x_left, x_right))
        sz = float(rng.uniform(0.5, 3.0))
        cv.paint(
            cam.points([(xc, 0, zc), (xc + sz, 0, zc), (xc + sz, 0, zc + 2 * sz), (xc, 0, zc + 2 * sz)]),
            shade(road_col, float(rng.uniform(0.75, 1.15))),
        )

    # vertical structures along both sides, far to near
    side_items: list[tuple[float, Callable[[], None]]] = []
    for s in (-1, 1):
        for z0, z1, kind in segments[s]:
            if kind == "building":
                height = float(rng.uniform(7.0, 28.0))

                def draw_b(s: int = s, z0: float = z0, z1: float = z1, height: float = height) -> None:
                    objects.facade(cv, cam, rng, style, front[s], z0, z1, height, s)

                side_items.append((z0, draw_b))
            elif kind == "vegetation":
                for zz in np.arange(z0, z1, float(rng.uniform(2.5, 5.0))):
                    xx = front[s] + s * float(rng.uniform(0.0, 4.0))

                    def draw_t(xx: float = xx, zz: float = float(zz)) -> None:
                        objects.tree(cv, cam, rng, style, xx, zz, 1.3)

                    side_items.append((float(zz), draw_t))
            else:
                xb = front[s] + s * float(rng.uniform(10.0, 30.0))
                height = float(rng.uniform(8.0, 25.0))

                def draw_far(
                    s: int = s, xb: float = xb, z0: float = z0, z1: float = z1, height: float = height
                ) -> None:
                    objects.facade(cv, cam, rng, style, xb, z0, z1 + 10.0, height, s)

                side_items.append((z0 + 0.01, draw_far))
    for _, draw in sorted(side_items, key=lambda t: -t[0]):
        draw()
    barriers: list[tuple[float, Callable[[], None]]] = []
    for s in (-1, 1):
        for z0, z1, _kind in segments[s]:
            r = rng.uniform()
            for kind, p in (("fence", lab.fence_prob), ("wall", lab.wall_prob), ("hedge", lab.hedge_prob)):
                if r < p:
                    height = {
                        "fence": rng.uniform(1.0, 2.0),
                        "wall": rng.uniform(0.8, 2.5),
                        "hedge": rng.uniform(0.8, 1.8),
                    }[kind]
                    xb = outer[s] - s * 0.1

                    def draw_bar(
                        kind: str = kind,
                        xb: float = xb,
                        z0: float = z0,
                        z1: float = z1,
                        height: float = float(height),
                    ) -> None:
                        objects.barrier(
                            cv, cam, rng, style, kind, xb, max(z0, 1.0), z1, height, lab.thin_scale
                        )

                    barriers.append((z0, draw_bar))
                    break
                r -= p
    for _, draw in sorted(barriers, key=lambda t: -t[0]):
        draw()

    # things and street furniture, far to near
    items: list[tuple[float, Callable[[], None]]] = []
    size = lab.object_scale
    for s in (-1, 1):
        z = float(rng.exponential(lab.pole_spacing))
        while z < far * 0.7:
            zz = max(z, 3.0)
            light = bool(rng.uniform() < lab.traffic_light_prob)
            sign = bool(rng.uniform() < lab.sign_prob)
            ph = (
                float(rng.uniform(4.5, 8.0)) if light or rng.uniform() < 0.5 else float(rng.uniform(2.6, 3.6))
            )
            pw = float(rng.uniform(0.12, 0.3)) * lab.thin_scale
            px = curb[s] + s * 0.45

            def draw_p(
                px: float = px,
                zz: float = zz,
                ph: float = ph,
                pw: float = pw,
                light: bool = light,
                sign: bool = sign,
            ) -> None:
                objects.pole(cv, cam, rng, style, px, zz, ph, pw, light, sign)

            items.append((zz, draw_p))
            z += float(rng.exponential(lab.pole_spacing)) + 2.0
        z = float(rng.exponential(lab.curb_tree_spacing))
        while z < far * 0.6:
            tx = curb[s] + s * float(rng.uniform(0.8, max(1.0, walk[0 if s < 0 else 1] - 0.5)))

            def draw_ct(tx: float = tx, z: float = max(z, 6.0)) -> None:
                objects.tree(cv, cam, rng, style, tx, z)

            if cross is None or not cross[0] - 2.0 < z < cross[1] + 2.0:
                items.append((max(z, 6.0), draw_ct))
            z += float(rng.exponential(lab.curb_tree_spacing)) + 3.0

    occupied: list[tuple[float, float, float, float]] = []  # x0, x1, z0, z1 of vehicles
    if cross is not None:  # no parking in the junction
        occupied += [
            (x_left, x_left + 2.2, cross[0] - 3.0, cross[1]),
            (x_right - 2.2, x_right, cross[0] - 3.0, cross[1]),
        ]

    def free(x0: float, x1: float, z0: float, z1: float) -> bool:
        return all(x1 <= a or x0 >= b or z1 <= c or z0 >= d for a, b, c, d in occupied)

    def add_vehicle(
        cls: int, dims: tuple[float, float, float], lane_x: float, z0: float, facing: bool
    ) -> None:
        wv, lv, hv = dims[0] * size, dims[1] * size, dims[2] * size
        x0, x1 = lane_x - wv / 2, lane_x + wv / 2
        if abs(lane_x) < wv / 2 + 0.5 and z0 < 7.0:  # nothing right in front of the camera
            return
        if not free(x0 - 0.3, x1 + 0.3, z0 - 1.0, z0 + lv + 1.0):
            return
        occupied.append((x0, x1, z0, z0 + lv))

        def draw_v() -> None:
            objects.box_vehicle(cv, cam, rng, style, cls, lane_x, z0, (wv, lv, hv), facing)

        items.append((z0, draw_v))

    lane_centres = [x_left + (k + 0.5) * scene.lane_width for k in range(lanes)]
    oncoming_lanes = max(1, lanes // 2)

    def lane_pick() -> tuple[float, bool]:
        k = int(rng.integers(lanes))
        return lane_centres[k] + float(rng.normal(0, 0.2)), k < oncoming_lanes

    if rng.uniform() < lab.train_prob:  # tram in the middle of the street
        add_vehicle(
            C["train"],
            (2.65, 30.0, 3.6),
            (x_left + x_right) / 2,
            _depth(rng, lab, 12.0),
            bool(rng.uniform() < 0.5),
        )
    for cls, rate, dims in (
        (C["bus"], lab.buses, (2.55, 12.0, 3.2)),
        (C["truck"], lab.trucks, (2.45, 8.0, 3.4)),
        (C["car"], lab.cars, (1.8, 4.4, 1.5)),
    ):
        for _ in range(int(rng.poisson(rate))):
            lx, oncoming = lane_pick()
            add_vehicle(
                cls,
                (
                    dims[0] * rng.uniform(0.92, 1.08),
                    dims[1] * rng.uniform(0.9, 1.1),
                    dims[2] * rng.uniform(0.9, 1.1),
                ),
                lx,
                _depth(rng, lab),
                oncoming,
            )
    for _ in range(int(rng.poisson(lab.parked_cars))):
        s = -1 if rng.uniform() < 0.5 else 1
        lx = curb[s] - s * 1.05
        add_vehicle(
            C["car"],
            (1.8 * rng.uniform(0.92, 1.08), 4.4 * rng.uniform(0.9, 1.1), 1.5 * rng.uniform(0.9, 1.1)),
            lx,
            _depth(rng, lab, 4.0),
            bool(rng.uniform() < 0.5),
        )

    def add_figure(x: float, z: float, draw: Callable[[float, float, float], object]) -> None:
        """`draw(u, v, pixels_per_metre)` with (u, v) the projection of the ground point (x, 0, z)."""

        def draw_f(x: float = x, z: float = z) -> None:
            (u, v) = cam.points([(x, 0, z)])[0]
            draw(u, v, cam.scale(z) * size)

        items.append((z, draw_f))

    def sidewalk_x(s: int) -> float:
        return float(rng.uniform(min(curb[s], outer[s]) + 0.4, max(curb[s], outer[s]) - 0.4))

    def side() -> int:
        return -1 if rng.uniform() < 0.5 else 1

    for _ in range(int(rng.poisson(lab.persons))):
        s = side()
        height, pose = float(rng.uniform(1.55, 1.95)), "walk" if rng.uniform() < 0.7 else "stand"
        person = partial(
            objects.person, cv, rng, style, C["person"], height=height, pose=pose, direction=side()
        )
        add_figure(sidewalk_x(s), _depth(rng, lab, 3.0), person)
    for _ in range(int(rng.poisson(lab.crossing_persons))):
        height = float(rng.uniform(1.55, 1.95))
        person = partial(
            objects.person, cv, rng, style, C["person"], height=height, pose="walk", direction=side()
        )
        add_figure(float(rng.uniform(x_left, x_right)), _depth(rng, lab), person)
    for vehicle, rate in (("bicycle", lab.bicycle_riders), ("motorcycle", lab.motorcycle_riders)):
        for _ in range(int(rng.poisson(rate))):
            s = side()
            on_road = rng.uniform() < 0.7 or vehicle == "motorcycle"
            x = curb[s] - s * float(rng.uniform(0.5, 1.5)) if on_road else sidewalk_x(s)
            rider = partial(
                objects.rider, cv, rng, style, direction=side(), vehicle=vehicle, thin=lab.thin_scale
            )
            add_figure(x, _depth(rng, lab), rider)
    for _ in range(int(rng.poisson(lab.parked_bicycles))):
        s = side()
        bike = partial(objects.bicycle, cv, rng, style, direction=side(), thin=lab.thin_scale)
        add_figure(outer[s] + s * 0.5, _depth(rng, lab, 3.0), bike)
    for _ in range(int(rng.poisson(lab.parked_motorcycles))):
        s = side()
        add_figure(
            curb[s] - s * 0.6,
            _depth(rng, lab, 3.0),
            partial(objects.motorcycle, cv, rng, style, direction=side()),
        )

    for _, draw in sorted(items, key=lambda t: -t[0]):
        draw()

    if rng.uniform() < lab.ego_hood_prob:  # the ego vehicle's bonnet, labelled "ego vehicle" (ignored)
        top = h * float(rng.uniform(0.86, 0.92))
        hood = jitter(rng, (40, 42, 45), 6.0)
        cv.polygon(
            [
                (-5, h + 5),
                (-5, top + 0.06 * h),
                (w * 0.2, top + 0.01 * h),
                (w * 0.5, top),
                (w * 0.8, top + 0.01 * h),
                (w + 5, top + 0.06 * h),
                (w + 5, h + 5),
            ],
            EGO,
            hood,
        )

    rgb, labels = cv.arrays()
    return apply_style(rng, rgb, labels, style), labels
