// GLSL ES 3.00 sources of one NCA step, generated from the page's model (docs/MODEL.md): its
// config, and its filter taps compiled in as literals (filter k on channel c: filters[k][c]).
// The state lives in G = ceil(C / 4) RGBA32F textures S0..S{G-1}: channel c is component
// c % 4 of texture c / 4. The weights are one RGBA32F texture W (nca_fast/export/__init__.py,
// pack_weights): row h holds W1's F*G vec4s (column k*G + g: filter k on channels 4g..4g+3),
// then W2's G vec4s (column F*G + g: outputs 4g..4g+3 of hidden unit h), then b1[h] in
// column F*G + G; row `hidden` holds b2 in columns 0..G-1.
"use strict";

const NCAShaders = (function () {
  const HEADER = "#version 300 es\nprecision highp float;\nprecision highp int;\n" +
    "precision highp sampler2D;\n";
  const VERTEX = "#version 300 es\nin vec2 pos;\nvoid main() { gl_Position = vec4(pos, 0.0, 1.0); }\n";

  function lit(v) {
    // A float literal GLSL reads back to the same float32 (17 significant digits cover float64).
    let s = Number(v).toPrecision(17);
    if (!/[.e]/.test(s)) s += ".0";
    return "float(" + s + ")";
  }

  function samplers(G, prefix) {
    let s = "";
    for (let g = 0; g < G; g++) s += "uniform sampler2D " + prefix + g + ";\n";
    return s;
  }

  // GLSL function `name`(tex, c, dx, dy): the cell at offset (dx, dy) of `c` in state texture
  // `tex`, for |dx|, |dy| <= 2 on a grid of at least 3 x 3. Across the grid's edge: zero under
  // "zeros" padding, wrapped under "circular", the nearest edge cell under "replicate", the cell
  // mirrored about the edge cell under "reflect" (-1 -> 1, n -> n - 2).
  function fetcher(name, padding) {
    const head = "vec4 " + name + "(sampler2D tex, ivec2 c, int dx, int dy) {\n" +
      "  ivec2 q = c + ivec2(dx, dy);\n";
    const fetch = "  return texelFetch(tex, q, 0);\n}\n";
    if (padding === "zeros") {
      return head + "  if (any(lessThan(q, ivec2(0))) || any(greaterThanEqual(q, size))) " +
        "return vec4(0.0);\n" + fetch;
    }
    if (padding === "circular") return head + "  q = (q + size) % size;\n" + fetch;
    if (padding === "replicate") return head + "  q = clamp(q, ivec2(0), size - 1);\n" + fetch;
    if (padding === "reflect") {
      return head + "  q = abs(q);\n  q = min(q, 2 * (size - 1) - q);\n" + fetch;
    }
    throw new NCAError("padding: the page runs zeros, circular, replicate and reflect, not " +
      JSON.stringify(padding));
  }

  // The alive masks' 3x3 max-pool wraps under circular padding; under every other padding the
  // cells outside the grid are dead, as zeros (the threshold is >= 0).
  function aliveFetcher(padding) {
    return fetcher("alpha", padding === "circular" ? "circular" : "zeros");
  }

  // Philox4x32-10 as triton.language.philox and nca_fast/rng.py compute it: key = the seed's
  // low and high words, counter = (cell, 0, step, 0) for a grid of one batch element; the cell
  // fires when the first word's top 24 bits are below `threshold`.
  const PHILOX =
    "uvec2 mulhilo(uint a, uint b) {\n" +
    "  uint al = a & 0xFFFFu, ah = a >> 16, bl = b & 0xFFFFu, bh = b >> 16;\n" +
    "  uint ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;\n" +
    "  uint mid = (ll >> 16) + (lh & 0xFFFFu) + (hl & 0xFFFFu);\n" +
    "  return uvec2(hh + (lh >> 16) + (hl >> 16) + (mid >> 16), a * b);\n}\n" +
    "bool fires(uint cell, uint t) {\n" +
    "  uint c0 = cell, c1 = 0u, c2 = t, c3 = 0u, k0 = key.x, k1 = key.y;\n" +
    "  for (int i = 0; i < 10; i++) {\n" +
    "    uvec2 b = mulhilo(0xCD9E8D57u, c2);\n" +
    "    uvec2 a = mulhilo(0xD2511F53u, c0);\n" +
    "    c0 = b.x ^ c1 ^ k0; c1 = b.y; c2 = a.x ^ c3 ^ k1; c3 = a.y;\n" +
    "    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;\n" +
    "  }\n" +
    "  return (c0 >> 8) < threshold;\n}\n";

  // Perception of group g by filter k: sum over taps i of taps[k][c][i / 3][i % 3] * x_g_i for
  // the group's channels c = 4g..4g+3, a scalar literal where the group's channels share the
  // tap (every fixed bank), else a vec4 of literals (zero past the last channel). Taps that are
  // zero on every channel are skipped.
  function perception(m, k, g, used) {
    const terms = [];
    for (const i of used) {
      const w = [];
      for (let c = 4 * g; c < Math.min(4 * g + 4, m.channels); c++) {
        w.push(m.filters[k][c][Math.floor(i / 3)][i % 3]);
      }
      if (w.every((v) => v === 0)) continue;
      const x = "x" + g + "_" + i;
      if (w.every((v) => v === w[0])) {
        terms.push(lit(w[0]) + " * " + x);
      } else {
        while (w.length < 4) w.push(0);
        terms.push("vec4(" + w.map(lit).join(", ") + ") * " + x);
      }
    }
    return terms.length ? terms.join(" + ") : "vec4(0.0)";
  }

  // The update pass for output groups [g0, g1): perception, the two dense layers, the update
  // mask: u = x + dx * m. Writes one vec4 per output group (multiple render targets).
  // m.filters: F x C x 3 x 3 taps (filter k on channel c).
  function update(m, g0, g1) {
    const G = m.groups, F = m.filters.length, H = m.hidden;
    let s = HEADER + samplers(G, "S") + "uniform sampler2D W;\nuniform ivec2 size;\n" +
      "uniform uvec2 key;\nuniform uint threshold;\nuniform uint t;\nuniform float aliveThreshold;\n";
    for (let g = g0; g < g1; g++) s += "layout(location = " + (g - g0) + ") out vec4 o" + g + ";\n";
    s += fetcher("at", m.padding) + PHILOX;
    if (m.aliveThreshold !== null) s += aliveFetcher(m.padding);
    s += "void main() {\n  ivec2 c = ivec2(gl_FragCoord.xy);\n";
    // The taps any filter uses on any channel, fetched once per group.
    const used = [];
    for (let i = 0; i < 9; i++) {
      if (m.filters.some((f) => f.some((t) => t[Math.floor(i / 3)][i % 3] !== 0))) used.push(i);
    }
    for (let g = 0; g < G; g++) {
      for (const i of used) {
        s += "  vec4 x" + g + "_" + i + " = at(S" + g + ", c, " + (i % 3 - 1) + ", " +
          (Math.floor(i / 3) - 1) + ");\n";
      }
      if (!used.includes(4)) s += "  vec4 x" + g + "_4 = at(S" + g + ", c, 0, 0);\n";
    }
    for (let k = 0; k < F; k++) {
      for (let g = 0; g < G; g++) {
        s += "  vec4 p" + k + "_" + g + " = " + perception(m, k, g, used) + ";\n";
      }
    }
    for (let g = g0; g < g1; g++) s += "  vec4 a" + g + " = vec4(0.0);\n";
    if (m.aliveThreshold !== null) {
      // Where no cell of the 5x5 neighbourhood is alive, the cell and its 3x3 neighbours all
      // fail the pre-update alive mask: the mask pass zeroes them whatever this cell's update,
      // and nothing reads it. Skip the dense layers there.
      const ag = m.alphaGroup, ac = "xyzw"[m.alphaComponent];
      s += "  float near = 0.0;\n" +
        "  for (int dy = -2; dy <= 2; dy++) for (int dx = -2; dx <= 2; dx++) {\n" +
        "    near = max(near, alpha(S" + ag + ", c, dx, dy)." + ac + ");\n  }\n";
      s += "  if (!(near > aliveThreshold)) {\n";
      for (let g = g0; g < g1; g++) s += "    o" + g + " = vec4(0.0);\n";
      s += "    return;\n  }\n";
    }
    s += "  for (int h = 0; h < " + H + "; h++) {\n";
    s += "    float v = texelFetch(W, ivec2(" + (F * G + G) + ", h), 0).x;\n";
    for (let k = 0; k < F; k++) {
      for (let g = 0; g < G; g++) {
        s += "    v += dot(texelFetch(W, ivec2(" + (k * G + g) + ", h), 0), p" + k + "_" + g + ");\n";
      }
    }
    s += "    v = max(v, 0.0);\n";
    for (let g = g0; g < g1; g++) {
      s += "    a" + g + " += v * texelFetch(W, ivec2(" + (F * G + g) + ", h), 0);\n";
    }
    s += "  }\n";
    s += "  bool m = fires(uint(c.y * size.x + c.x), t);\n";
    for (let g = g0; g < g1; g++) {
      s += "  vec4 d" + g + " = a" + g + " + texelFetch(W, ivec2(" + g + ", " + H + "), 0);\n";
      s += "  o" + g + " = m ? x" + g + "_4 + d" + g + " : x" + g + "_4;\n";
    }
    return s + "}\n";
  }

  // The alive masks: a cell keeps its updated value u when the 3x3 max of alpha is above the
  // threshold both in the state before the step (S) and after the update (U); else it is zero.
  function alive(m, g0, g1) {
    const G = m.groups, ag = m.alphaGroup, ac = "xyzw"[m.alphaComponent];
    let s = HEADER + samplers(G, "S") + samplers(G, "U") + "uniform ivec2 size;\n" +
      "uniform float aliveThreshold;\n";
    for (let g = g0; g < g1; g++) s += "layout(location = " + (g - g0) + ") out vec4 o" + g + ";\n";
    s += aliveFetcher(m.padding);
    s += "void main() {\n  ivec2 c = ivec2(gl_FragCoord.xy);\n" +
      "  float pre = 0.0, post = 0.0;\n" +
      "  for (int dy = -1; dy <= 1; dy++) for (int dx = -1; dx <= 1; dx++) {\n" +
      "    pre = max(pre, alpha(S" + ag + ", c, dx, dy)." + ac + ");\n" +
      "    post = max(post, alpha(U" + ag + ", c, dx, dy)." + ac + ");\n  }\n" +
      "  bool keep = pre > aliveThreshold && post > aliveThreshold;\n";
    for (let g = g0; g < g1; g++) {
      s += "  o" + g + " = keep ? texelFetch(U" + g + ", c, 0) : vec4(0.0);\n";
    }
    return s + "}\n";
  }

  // Erases a disc (the article's damage): cells within `radius` of `centre` become zero.
  function erase(m, g0, g1) {
    let s = HEADER + samplers(m.groups, "S") + "uniform vec2 centre;\nuniform float radius;\n";
    for (let g = g0; g < g1; g++) s += "layout(location = " + (g - g0) + ") out vec4 o" + g + ";\n";
    s += "void main() {\n  ivec2 c = ivec2(gl_FragCoord.xy);\n" +
      "  bool gone = distance(vec2(c) + 0.5, centre) < radius;\n";
    for (let g = g0; g < g1; g++) s += "  o" + g + " = gone ? vec4(0.0) : texelFetch(S" + g + ", c, 0);\n";
    return s + "}\n";
  }

  // The picture: channels 0..2 (premultiplied colour) over a white background with alpha,
  // nearest cell, row 0 at the top. `view` = (x0, y0, cells across, cells down) of the grid shown.
  function display(m) {
    const G = m.groups;
    const ch = (c) => (c < m.channels ? "S" + Math.floor(c / 4) + "." : null);
    let s = HEADER + samplers(G, "S") + "uniform ivec2 size;\nuniform vec4 view;\n" +
      "uniform vec2 canvas;\nout vec4 colour;\n";
    s += "void main() {\n  vec2 f = gl_FragCoord.xy / canvas;\n" +
      "  vec2 g = view.xy + vec2(f.x, 1.0 - f.y) * view.zw;\n" +
      "  ivec2 c = ivec2(floor(g));\n" +
      "  if (any(lessThan(g, vec2(0.0))) || any(greaterThanEqual(c, size))) {\n" +
      "    colour = vec4(0.93, 0.93, 0.93, 1.0); return;\n  }\n";
    for (let g = 0; g < G; g++) s += "  vec4 S" + g + " = texelFetch(S" + g + "_, c, 0);\n";
    const comp = (c) => (ch(c) ? ch(c) + "xyzw"[c % 4] : "0.0");
    s += "  float a = clamp(" + comp(m.alphaChannel) + ", 0.0, 1.0);\n" +
      "  vec3 rgb = vec3(" + comp(0) + ", " + comp(1) + ", " + comp(2) + ");\n" +
      "  colour = vec4(clamp(1.0 - a + rgb, 0.0, 1.0), 1.0);\n}\n";
    return s.replace(/uniform sampler2D S(\d+);/g, "uniform sampler2D S$1_;");
  }

  return { VERTEX, update, alive, erase, display };
})();
