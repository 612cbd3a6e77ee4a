"""Drawing of the individual street objects: vehicles as boxes in perspective, people and two-wheelers as
side-view figures scaled by depth, poles with lights and signs, trees, facades and barriers.

All sizes are in metres; the camera turns them into pixels, so distance sets apparent size and occlusion
comes from drawing far to near.
"""

from __future__ import annotations

import itertools

import numpy as np

from training.data.synth.canvas import C, Camera, Canvas, Color, jitter, shade
from training.data.synth.config import DomainStyle


def _pick(rng: np.random.Generator, palette: tuple[tuple[float, float, float], ...], std: float) -> Color:
    return jitter(rng, palette[int(rng.integers(len(palette)))], std)


# ---------------------------------------------------------------- vehicles


def box_vehicle(
    cv: Canvas,
    cam: Camera,
    rng: np.random.Generator,
    style: DomainStyle,
    cls: int,
    x: float,
    z0: float,
    size: tuple[float, float, float],  # width, length, height
    facing_camera: bool,
) -> None:
    """A car, truck, bus or train: lower body box, cabin or window band, wheels, lights, ground shadow.

    (x, z0) is the centre of the near face on the ground; the vehicle extends to z0 + length.
    """
    w, length, h = size
    x0, x1 = x - w / 2, x + w / 2
    z1 = z0 + length
    body = _pick(rng, style.vehicle_colors, style.color_jitter)
    win = jitter(rng, style.window, 8.0)
    dark = (22, 22, 24)
    lift = 0.3 if cls == C["car"] else 0.45
    # cars: body up to 0.55 h, cabin above; big vehicles: one box with a band of windows
    is_car = cls == C["car"]
    hb = 0.58 * h if is_car else h
    # shadow on the road, colour only
    cv.paint(
        cam.points([(x0 - 0.1, 0, z0 - 0.2), (x1 + 0.1, 0, z0 - 0.2), (x1 + 0.1, 0, z1), (x0 - 0.1, 0, z1)]),
        dark,
    )
    side_x = x0 if x > 0 else x1  # the side facing the camera's axis
    see_side = abs(x) > w / 2
    # top of the lower body (visible from a camera above it)
    if cam.height > hb:
        cv.polygon(
            cam.points([(x0, hb, z0), (x1, hb, z0), (x1, hb, z1), (x0, hb, z1)]), cls, shade(body, 1.08)
        )
    if see_side:
        cv.polygon(
            cam.points([(side_x, lift, z0), (side_x, hb, z0), (side_x, hb, z1), (side_x, lift, z1)]),
            cls,
            shade(body, 0.85),
        )
        if not is_car:  # window band along the side (bus, train) or plain side (truck)
            if cls in (C["bus"], C["train"]):
                n = max(2, int(length / 2.2))
                zs = np.linspace(z0 + 0.8, z1 - 0.8, n + 1)
                for a, b in itertools.pairwise(zs):
                    cv.paint(
                        cam.points(
                            [
                                (side_x, 0.45 * h, a + 0.15),
                                (side_x, 0.85 * h, a + 0.15),
                                (side_x, 0.85 * h, b - 0.15),
                                (side_x, 0.45 * h, b - 0.15),
                            ]
                        ),
                        win,
                    )
            else:
                cv.paint_line(cam.points([(side_x, 0.5 * h, z0), (side_x, 0.5 * h, z1)]), shade(body, 0.7), 1)
        for zw in (z0 + min(1.0, 0.2 * length), z1 - min(1.0, 0.2 * length)):
            r = 0.34 if is_car else 0.5
            (ua, va), (ub, vb) = cam.points([(side_x, 2 * r, zw - r), (side_x, 0.0, zw + r)])
            cv.ellipse((min(ua, ub), min(va, vb), max(ua, ub), max(va, vb)), cls, dark)
    if is_car:
        # cabin: side window and sloped front/back
        xi0, xi1 = x0 + 0.12 * w, x1 - 0.12 * w
        zc0, zc1 = z0 + 0.22 * length, z0 + 0.78 * length
        side_i = xi0 if x > 0 else xi1
        if cam.height > h:
            cv.polygon(
                cam.points(
                    [(xi0, h, zc0 + 0.3), (xi1, h, zc0 + 0.3), (xi1, h, zc1 - 0.4), (xi0, h, zc1 - 0.4)]
                ),
                cls,
                body,
            )
        if see_side:
            cv.polygon(
                cam.points(
                    [(side_i, hb, zc0), (side_i, h, zc0 + 0.3), (side_i, h, zc1 - 0.4), (side_i, hb, zc1)]
                ),
                cls,
                win,
            )
        cv.polygon(
            cam.points([(xi0, hb, zc0), (xi1, hb, zc0), (xi1, h, zc0 + 0.3), (xi0, h, zc0 + 0.3)]), cls, win
        )
    # near face
    cv.polygon(cam.points([(x0, lift, z0), (x1, lift, z0), (x1, hb, z0), (x0, hb, z0)]), cls, body)
    if not is_car:
        wy0 = 0.45 * h if cls != C["truck"] or facing_camera else 0.0
        if wy0 > 0:
            cv.paint(
                cam.points(
                    [
                        (x0 + 0.15, wy0, z0),
                        (x1 - 0.15, wy0, z0),
                        (x1 - 0.15, 0.88 * h, z0),
                        (x0 + 0.15, 0.88 * h, z0),
                    ]
                ),
                win,
            )
        else:  # truck rear doors
            cv.paint_line(cam.points([(x, lift + 0.1, z0), (x, h - 0.1, z0)]), shade(body, 0.6), 1)
    # wheels under the near face, lights, plate
    for wx in (x0 + 0.05, x1 - 0.35):
        cv.polygon(
            cam.points(
                [
                    (wx, 0, z0 + 0.3),
                    (wx + 0.3, 0, z0 + 0.3),
                    (wx + 0.3, lift + 0.05, z0 + 0.3),
                    (wx, lift + 0.05, z0 + 0.3),
                ]
            ),
            cls,
            dark,
        )
    light = (250, 245, 220) if facing_camera else (210, 30, 30)
    ly = lift + 0.55 * (hb - lift) if is_car else lift + 0.35
    for lx in (x0 + 0.08, x1 - 0.33):
        cv.paint(
            cam.points([(lx, ly, z0), (lx + 0.25, ly, z0), (lx + 0.25, ly + 0.12, z0), (lx, ly + 0.12, z0)]),
            light,
        )
    cv.paint(
        cam.points(
            [
                (x - 0.25, lift + 0.1, z0),
                (x + 0.25, lift + 0.1, z0),
                (x + 0.25, lift + 0.22, z0),
                (x - 0.25, lift + 0.22, z0),
            ]
        ),
        (235, 235, 225),
    )
    if cls == C["train"]:  # pantograph: thin lines, part of the train
        (ua, va), (ub, vb), (uc, vc) = cam.points(
            [(x - 0.5, h, z0 + 4), (x, h + 1.0, z0 + 4.5), (x + 0.5, h, z0 + 5)]
        )
        cv.line([(ua, va), (ub, vb), (uc, vc)], cls, dark, 1)


# ---------------------------------------------------------------- people and two-wheelers


def person(
    cv: Canvas,
    rng: np.random.Generator,
    style: DomainStyle,
    cls: int,
    u: float,
    v: float,
    s: float,
    height: float,
    pose: str,
    direction: int,
) -> None:
    """A person with feet (pose 'walk' / 'stand') or seat (pose 'ride') at pixel (u, v); s px per metre."""
    shirt = _pick(rng, style.clothing_colors, style.color_jitter)
    pants = _pick(rng, style.clothing_colors, style.color_jitter)
    skin = jitter(rng, style.skin, 12.0)
    hair = jitter(rng, (45, 35, 30), 10.0)
    d = direction
    hh = height * s

    def p(x: float, y: float) -> tuple[float, float]:  # metres relative to the anchor -> pixels
        return (u + d * x * s, v - y * s)

    lw = max(1.0, 0.13 * s)
    if pose == "ride":
        hip = (0.0, 0.0)
        knee = (0.38, 0.22)
        foot = (0.30, -0.35)
        shoulder = (0.22, 0.55)
        head_c = (0.32, 0.70)
        hand = (0.62, 0.40)
        for k, f in ((knee, foot), ((knee[0] - 0.1, knee[1] - 0.05), (foot[0] - 0.15, foot[1] + 0.05))):
            cv.line([p(*hip), p(*k), p(*f)], cls, pants, lw)
        cv.polygon(
            [
                p(-0.12, 0.02),
                p(0.1, -0.02),
                p(shoulder[0] + 0.1, shoulder[1]),
                p(shoulder[0] - 0.12, shoulder[1] + 0.02),
            ],
            cls,
            shirt,
        )
        cv.line([p(*shoulder), p(*hand)], cls, shirt, max(1.0, 0.09 * s))
        r = 0.12
    else:
        spread = 0.18 if pose == "walk" else 0.05
        hip_y = 0.5 * height
        cv.line([p(-0.02, hip_y), p(-spread, 0.0)], cls, pants, lw)
        cv.line([p(0.02, hip_y), p(spread, 0.0)], cls, pants, lw)
        top = 0.82 * height
        cv.polygon([p(-0.17, hip_y), p(0.17, hip_y), p(0.2, top), p(-0.2, top)], cls, shirt)
        swing = 0.15 if pose == "walk" else 0.03
        cv.line([p(0.14, top - 0.02), p(0.2 + swing, 0.5 * height)], cls, shirt, max(1.0, 0.08 * s))
        cv.line([p(-0.14, top - 0.02), p(-0.2 - swing, 0.5 * height)], cls, shirt, max(1.0, 0.08 * s))
        head_c = (0.0, 0.91 * height)
        r = 0.065 * height
    hx, hy = p(*head_c)
    cv.ellipse((hx - r * s, hy - r * s * 1.15, hx + r * s, hy + r * s * 1.15), cls, skin)
    cv.ellipse((hx - r * s, hy - r * s * 1.2, hx + r * s, hy - r * s * 0.1), cls, hair)
    del hh


def bicycle(
    cv: Canvas,
    rng: np.random.Generator,
    style: DomainStyle,
    u: float,
    v: float,
    s: float,
    direction: int,
    thin: float,
) -> tuple[float, float]:
    """A side-view bicycle standing on (u, v); returns the pixel position of the saddle."""
    cls = C["bicycle"]
    frame = _pick(rng, style.vehicle_colors, style.color_jitter)
    tyre = (25, 25, 25)
    d = direction

    def p(x: float, y: float) -> tuple[float, float]:
        return (u + d * x * s, v - y * s)

    r = 0.34
    tw = max(1, round(0.08 * s * thin))
    for cx in (-0.52, 0.52):
        a, b = p(cx - r, 2 * r), p(cx + r, 0)
        cv.ring((min(a[0], b[0]), a[1], max(a[0], b[0]), b[1]), cls, tyre, tw)
    fw = max(1.0, 0.06 * s * thin)
    rear, crank, seat, head, front = p(-0.52, r), p(0.0, 0.3), p(-0.15, 0.85), p(0.38, 0.85), p(0.52, r)
    cv.line([rear, crank, seat, rear], cls, frame, fw)
    cv.line([crank, head, seat], cls, frame, fw)
    cv.line([front, head, p(0.32, 1.0)], cls, frame, fw)
    cv.line([p(0.25, 1.0), p(0.42, 1.0)], cls, tyre, fw)
    cv.line([p(-0.25, 0.88), p(-0.05, 0.88)], cls, tyre, max(1.0, 0.06 * s))
    return p(-0.12, 0.9)


def motorcycle(
    cv: Canvas, rng: np.random.Generator, style: DomainStyle, u: float, v: float, s: float, direction: int
) -> tuple[float, float]:
    """A side-view motorcycle standing on (u, v); returns the pixel position of the seat."""
    cls = C["motorcycle"]
    body = _pick(rng, style.vehicle_colors, style.color_jitter)
    dark = (20, 20, 22)
    d = direction

    def p(x: float, y: float) -> tuple[float, float]:
        return (u + d * x * s, v - y * s)

    r = 0.32
    for cx in (-0.7, 0.7):
        a, b = p(cx - r, 2 * r), p(cx + r, 0)
        cv.ellipse((min(a[0], b[0]), a[1], max(a[0], b[0]), b[1]), cls, dark)
        c0, c1 = p(cx - 0.12, r + 0.12), p(cx + 0.12, r - 0.12)
        cv.ellipse((min(c0[0], c1[0]), c0[1], max(c0[0], c1[0]), c1[1]), cls, (150, 150, 155))
    cv.polygon(
        [
            p(-0.55, 0.45),
            p(-0.2, 0.3),
            p(0.35, 0.3),
            p(0.6, 0.55),
            p(0.45, 0.9),
            p(0.1, 0.85),
            p(-0.15, 0.8),
            p(-0.6, 0.75),
        ],
        cls,
        body,
    )
    cv.line([p(0.7, r), p(0.5, 1.05)], cls, dark, max(1.0, 0.07 * s))
    cv.line([p(0.4, 1.05), p(0.6, 1.08)], cls, dark, max(1.0, 0.06 * s))
    cv.ellipse(
        (*p(0.58, 0.9), *p(0.72, 0.78)) if d > 0 else (*p(0.72, 0.9), *p(0.58, 0.78)), cls, (240, 235, 200)
    )
    return p(-0.25, 0.85)


def rider(
    cv: Canvas,
    rng: np.random.Generator,
    style: DomainStyle,
    u: float,
    v: float,
    s: float,
    direction: int,
    vehicle: str,
    thin: float,
) -> None:
    if vehicle == "bicycle":
        seat = bicycle(cv, rng, style, u, v, s, direction, thin)
    else:
        seat = motorcycle(cv, rng, style, u, v, s, direction)
    person(cv, rng, style, C["rider"], seat[0], seat[1], s, 1.75, "ride", direction)


# ---------------------------------------------------------------- street furniture and vegetation


def pole(
    cv: Canvas,
    cam: Camera,
    rng: np.random.Generator,
    style: DomainStyle,
    x: float,
    z: float,
    height: float,
    width: float,
    light: bool,
    sign: bool,
) -> None:
    color = jitter(rng, style.class_colors[C["pole"]], style.color_jitter * 0.5)
    (ub, vb), (ut, vt) = cam.points([(x, 0, z), (x, height, z)])
    w = max(1.0, width * cam.scale(z))
    cv.polygon([(ub - w / 2, vb), (ub + w / 2, vb), (ut + w / 2, vt), (ut - w / 2, vt)], C["pole"], color)
    toward = -1.0 if x > 0 else 1.0  # arms reach over the road
    if light:
        arm = rng.uniform(0.5, 3.0)
        hx = x + toward * arm
        cv.line(
            cam.points([(x, height - 0.2, z), (hx, height - 0.2, z)]),
            C["pole"],
            color,
            max(1.0, 0.1 * cam.scale(z)),
        )
        housing = jitter(rng, style.class_colors[C["traffic light"]], 5.0)
        pts = cam.points(
            [
                (hx - 0.2, height - 0.2, z),
                (hx + 0.2, height - 0.2, z),
                (hx + 0.2, height - 1.2, z),
                (hx - 0.2, height - 1.2, z),
            ]
        )
        cv.polygon(pts, C["traffic light"], housing)
        lit = int(rng.integers(3))
        colors = ((230, 40, 30), (240, 180, 30), (40, 220, 90))
        for i in range(3):
            cy = height - 0.37 - 0.3 * i
            (lu, lv), (ru, rv) = cam.points([(hx - 0.1, cy + 0.1, z), (hx + 0.1, cy - 0.1, z)])
            c = colors[i] if i == lit else (60, 60, 55)
            cv.ellipse((lu, lv, max(ru, lu + 1), max(rv, lv + 1)), C["traffic light"], c)
    if sign:
        sy = rng.uniform(2.2, min(3.2, height - 0.3))
        size = rng.uniform(0.55, 0.9)
        (cu, cvv) = cam.points([(x, sy, z)])[0]
        r = size / 2 * cam.scale(z)
        kind = int(rng.integers(4))
        colors_ = ((220, 30, 30), (30, 70, 200), (240, 240, 240), (245, 200, 20))
        outer = jitter(rng, colors_[int(rng.integers(4))], 10.0)
        inner = jitter(rng, style.class_colors[C["traffic sign"]], 8.0)
        cls = C["traffic sign"]
        if kind == 0:  # round
            cv.ellipse((cu - r, cvv - r, cu + r, cvv + r), cls, outer)
            cv.ellipse((cu - 0.7 * r, cvv - 0.7 * r, cu + 0.7 * r, cvv + 0.7 * r), cls, inner)
        elif kind == 1:  # triangle
            cv.polygon([(cu, cvv - r), (cu + r, cvv + 0.8 * r), (cu - r, cvv + 0.8 * r)], cls, outer)
            cv.polygon(
                [(cu, cvv - 0.45 * r), (cu + 0.5 * r, cvv + 0.5 * r), (cu - 0.5 * r, cvv + 0.5 * r)],
                cls,
                inner,
            )
        elif kind == 2:  # rectangle
            cv.polygon(
                [
                    (cu - r, cvv - 0.7 * r),
                    (cu + r, cvv - 0.7 * r),
                    (cu + r, cvv + 0.7 * r),
                    (cu - r, cvv + 0.7 * r),
                ],
                cls,
                outer,
            )
        else:  # diamond
            cv.polygon([(cu, cvv - r), (cu + r, cvv), (cu, cvv + r), (cu - r, cvv)], cls, outer)


def tree(
    cv: Canvas,
    cam: Camera,
    rng: np.random.Generator,
    style: DomainStyle,
    x: float,
    z: float,
    scale: float = 1.0,
) -> None:
    """Trunk and a crown of overlapping blobs; all of it is vegetation, as in Cityscapes."""
    cls = C["vegetation"]
    base = style.class_colors[cls]
    trunk_h = rng.uniform(2.0, 4.0) * scale
    crown_r = rng.uniform(1.5, 3.5) * scale
    s = cam.scale(z)
    (ub, vb), (ut, vt) = cam.points([(x, 0, z), (x, trunk_h, z)])
    w = max(1.0, 0.3 * s)
    cv.polygon(
        [(ub - w / 2, vb), (ub + w / 2, vb), (ut + w / 3, vt), (ut - w / 3, vt)],
        cls,
        jitter(rng, (80, 60, 45), 8.0),
    )
    cu, cy = cam.points([(x, trunk_h + crown_r * 0.8, z)])[0]
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, 0.6 * crown_r, 2)
        oy = max(oy, -0.25 * crown_r)  # crowns do not sag down to the trunk's foot
        rr = crown_r * rng.uniform(0.5, 0.9) * s
        c = jitter(rng, base, style.color_jitter, rng.uniform(0.75, 1.15))
        cv.ellipse((cu + ox * s - rr, cy - oy * s - rr, cu + ox * s + rr, cy - oy * s + rr), cls, c)


def facade(
    cv: Canvas,
    cam: Camera,
    rng: np.random.Generator,
    style: DomainStyle,
    x: float,
    z0: float,
    z1: float,
    height: float,
    side: int,
) -> None:
    """A building along the street: facade plane at x from z0 to z1, end face toward the camera, windows."""
    cls = C["building"]
    color = _pick(rng, style.building_colors, style.color_jitter)
    away = side  # +1: right side of the street (facade faces -x)
    sunlit = 1.0 if side < 0 else style.sun_side
    front = cam.points([(x, 0, z0), (x, height, z0), (x + away * 40.0, height, z0), (x + away * 40.0, 0, z0)])
    side_pts = cam.points([(x, 0, z0), (x, height, z0), (x, height, z1), (x, 0, z1)])
    cv.polygon(side_pts, cls, shade(color, sunlit))
    win = jitter(rng, style.window, 10.0)
    frame = shade(color, 0.8 * sunlit)
    s_far = cam.scale(z1)
    floor_h = rng.uniform(2.8, 3.6)
    bay = rng.uniform(2.2, 3.4)
    # cornice
    cv.paint(
        cam.points([(x, height - 0.5, z0), (x, height, z0), (x, height, z1), (x, height - 0.5, z1)]), frame
    )
    # windows, on a grid of floors x bays; skipped once they would be smaller than a pixel
    if 1.2 * s_far >= 0.8 or 1.2 * cam.scale(z0 + bay) >= 0.8:
        floors = np.arange(1.0 + rng.uniform(0.0, 0.6), height - 1.2, floor_h)
        bays = np.arange(z0 + 0.8, z1 - 1.2, bay)
        if floors.size and bays.size:
            wh = min(1.6, floor_h * 0.55)
            ww = bay * 0.5
            fy, bz = np.meshgrid(floors, bays, indexing="ij")
            fy, bz = fy.ravel(), bz.ravel()
            xs = np.full(fy.shape, x)
            u0, v0 = cam.project(xs, fy, bz)
            u1, v1 = cam.project(xs, fy + wh, bz + ww)
            u0, u1 = np.clip(u0, -30000, 30000), np.clip(u1, -30000, 30000)
            keep = np.abs(u1 - u0) >= 0.7
            for a, b, c, d, e, f in zip(
                u0[keep], v0[keep], u1[keep], v1[keep], fy[keep], bz[keep], strict=True
            ):
                vv0 = cam.horizon + cam.focal * (cam.height - e - wh) / (f + ww)
                vv1 = cam.horizon + cam.focal * (cam.height - e) / f
                cv.paint([(a, b), (a, d), (c, vv0), (c, vv1)], win)
    # end face toward the camera, drawn last so it occludes the facade behind it
    cv.polygon(front, cls, shade(color, 0.9 * sunlit))
    if 1.0 * cam.scale(z0) >= 1.5:
        (ua, va) = cam.points([(x, 0, z0)])[0]
        s0 = cam.scale(z0)
        for fy_ in np.arange(1.2, height - 1.5, floor_h):
            for k in range(1, 6):
                xa = x + away * (k * 2.8)
                (pa, qa), (pb, qb) = cam.points([(xa, fy_, z0), (xa + away * 1.2, fy_ + 1.5, z0)])
                cv.paint([(pa, qa), (pb, qa), (pb, qb), (pa, qb)], win)
        del ua, va, s0


def barrier(
    cv: Canvas,
    cam: Camera,
    rng: np.random.Generator,
    style: DomainStyle,
    kind: str,
    x: float,
    z0: float,
    z1: float,
    height: float,
    thin: float,
) -> None:
    """A fence, wall or hedge running along x from z0 to z1 (closest end toward the camera at z0)."""
    cls = {"fence": C["fence"], "wall": C["wall"], "hedge": C["vegetation"]}[kind]
    color = jitter(rng, style.class_colors[cls], style.color_jitter)
    side = cam.points([(x, 0, z0), (x, height, z0), (x, height, z1), (x, 0, z1)])
    if kind == "fence":
        # posts and rails of a see-through fence; the whole fence area is labelled, as in Cityscapes
        rails = cam.points([(x, height, z0), (x, height, z1), (x, height * 0.1, z0), (x, height * 0.1, z1)])
        cv.polygon(side, cls, shade(color, 0.55))
        cv.line(rails[:2], cls, color, max(1.0, 0.08 * cam.scale(z0) * thin))
        cv.line(rails[2:], cls, color, max(1.0, 0.08 * cam.scale(z0) * thin))
        step = rng.uniform(0.12, 0.3)
        zs = np.arange(z0, z1, step)
        zs = zs[cam.focal / zs * step >= 2.0]
        for zz in zs[:200]:
            cv.paint_line(
                cam.points([(x, 0, zz), (x, height, zz)]), color, max(1.0, 0.04 * cam.scale(zz) * thin)
            )
        cv.polygon(
            cam.points([(x, 0, z0), (x, height, z0), (x + 0.1, height, z0), (x + 0.1, 0, z0)]), cls, color
        )
    elif kind == "wall":
        cv.polygon(side, cls, color)
        cv.paint(
            cam.points([(x, height - 0.15, z0), (x, height, z0), (x, height, z1), (x, height - 0.15, z1)]),
            shade(color, 1.15),
        )
    else:
        cv.polygon(side, cls, jitter(rng, style.class_colors[cls], style.color_jitter, 0.85))
