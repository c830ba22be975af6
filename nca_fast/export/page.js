// The page: grows the model from the seed, erases a disc where the pointer drags, and the
// controls. Opened as PAGE.html#steps=N&seed=S (and optionally &size=CELLS), it instead runs N
// steps without a UI loop and writes the state as JSON into <pre id="nca-state">. &erase=X,Y,R
// then erases the disc the pointer would (cells whose centre is within R of (X, Y)); &targets=K
// limits the render targets per pass to K (tests run the multi-pass path with it).
"use strict";

(function () {
  const model = JSON.parse(document.getElementById("nca-model").textContent);
  const params = new URLSearchParams(location.hash.slice(1));
  const $ = (id) => document.getElementById(id);
  const canvas = $("nca-canvas");

  function intParam(name, fallback, min) {
    if (!params.has(name)) return fallback;
    const text = params.get(name);
    if (!/^\d+$/.test(text) || Number(text) < min) {
      throw new NCAError(name + ": expected an integer >= " + min + ", got " + JSON.stringify(text));
    }
    return Number(text);
  }

  function fail(err) {
    const msg = err instanceof NCAError ? err.message : "unexpected error: " + err;
    $("nca-message").textContent = msg;
    $("nca-message").hidden = false;
    if (params.has("steps")) {
      $("nca-state").textContent = JSON.stringify({ error: msg });
      report($("nca-state").textContent);
    }
  }

  // The canvas fills the window below the controls.
  function fit() {
    const bar = $("nca-controls").getBoundingClientRect().height + 16;
    const side = Math.max(64, Math.floor(Math.min(window.innerWidth - 16, window.innerHeight - bar)));
    canvas.style.width = canvas.style.height = side + "px";
    canvas.width = canvas.height = Math.round(side * (window.devicePixelRatio || 1));
  }

  function info(engine) {
    return model.name + ", " + engine.size + " x " + engine.size + " cells, update-mask seed " + engine.seed;
  }

  function headless(engine) {
    const steps = intParam("steps", 0, 0);
    const t0 = performance.now();
    for (let i = 0; i < steps; i++) engine.step();
    if (params.has("erase")) {
      const disc = params.get("erase").split(",").map(Number);
      if (disc.length !== 3 || !disc.every(Number.isFinite)) {
        throw new NCAError("erase: expected X,Y,RADIUS in cells, got " + JSON.stringify(params.get("erase")));
      }
      engine.erase(disc[0], disc[1], disc[2]);
    }
    engine.finish();
    const ms = performance.now() - t0;
    const data = engine.read();
    fit();
    $("nca-step").textContent = "step " + engine.t;
    $("nca-info").textContent = info(engine);
    engine.draw(0, 0, engine.size);
    engine.finish();
    const state = JSON.stringify({
      shape: [model.channels, engine.size, engine.size], steps, seed: engine.seed.toString(),
      ms, renderer: engine.gl.getParameter(engine.gl.RENDERER), data: encodeFloats(data),
    });
    $("nca-state").textContent = state;
    report(state);
  }

  // In a frame (nca_fast.export.headless runs many pages in one browser that way), the state
  // or error also goes to the parent page.
  function report(state) {
    if (window.parent !== window) window.parent.postMessage({ page: location.href, state }, "*");
  }

  function interactive(engine) {
    const ui = {
      paused: false, perFrame: 1, zoom: 1, brush: Math.max(2, engine.size / 12),
      done: [],   // [time, steps] of recent frames, for steps per second
    };
    const view = () => {
      const span = engine.size / ui.zoom;
      return { x0: (engine.size - span) / 2, y0: (engine.size - span) / 2, span };
    };
    const status = () => {
      const now = performance.now();
      ui.done = ui.done.filter(([t]) => now - t < 1000);
      const n = ui.done.reduce((a, [, s]) => a + s, 0);
      const span = ui.done.length > 1 ? (now - ui.done[0][0]) / 1000 : 1;
      $("nca-step").textContent = "step " + engine.t;
      $("nca-rate").textContent = (ui.paused ? 0 : n / Math.max(span, 1e-3)).toFixed(0) + " steps/s";
    };
    const run = (n) => {
      for (let i = 0; i < n; i++) engine.step();
      ui.done.push([performance.now(), n]);
    };
    const frame = () => {
      if (!ui.paused) run(ui.perFrame);
      const v = view();
      engine.draw(v.x0, v.y0, v.span);
      status();
      requestAnimationFrame(frame);
    };
    const cell = (ev) => {
      const r = canvas.getBoundingClientRect(), v = view();
      return [v.x0 + (ev.clientX - r.left) / r.width * v.span, v.y0 + (ev.clientY - r.top) / r.height * v.span];
    };
    const erase = (ev) => {
      const [x, y] = cell(ev);
      engine.erase(x, y, ui.brush);
    };
    canvas.addEventListener("pointerdown", (ev) => { canvas.setPointerCapture(ev.pointerId); erase(ev); });
    canvas.addEventListener("pointermove", (ev) => { if (ev.buttons) erase(ev); });
    $("nca-reset").onclick = () => engine.reset();
    $("nca-pause").onclick = () => {
      ui.paused = !ui.paused;
      $("nca-pause").textContent = ui.paused ? "run" : "pause";
    };
    $("nca-single").onclick = () => {
      ui.paused = true;
      $("nca-pause").textContent = "run";
      run(1);
    };
    $("nca-speed").oninput = () => {
      ui.perFrame = Number($("nca-speed").value);
      $("nca-speed-v").textContent = ui.perFrame;
    };
    $("nca-zoom").oninput = () => {
      ui.zoom = Number($("nca-zoom").value);
      $("nca-zoom-v").textContent = ui.zoom + "x";
    };
    window.addEventListener("resize", fit);
    canvas.addEventListener("webglcontextlost", () => {
      fail(new NCAError("the browser took the GPU away from the page (WebGL context lost); " +
        "reload the page"));
    });
    $("nca-info").textContent = info(engine);
    fit();
    frame();          // the first frame now, the next ones on the browser's animation frames
  }

  try {
    const engine = new NCAEngine(canvas, model, intParam("size", model.size, 3), params.has("steps"),
      intParam("targets", 0, 1));
    const seed = params.has("seed") ? params.get("seed") : "0";
    if (!/^\d+$/.test(seed)) {
      throw new NCAError("seed: expected an integer in [0, 2**63), got " + JSON.stringify(seed));
    }
    engine.setSeed(seed);
    engine.reset();
    if (params.has("steps")) headless(engine);
    else interactive(engine);
  } catch (err) {
    fail(err);
  }
})();
