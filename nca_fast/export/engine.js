// The NCA on WebGL2: state textures, the step's passes, damage, drawing and reading back.
// One step = the update pass (NCAShaders.update) then, with alive masking, the mask pass
// (NCAShaders.alive); both write fresh textures, so three sets of G state textures rotate.
"use strict";

class NCAError extends Error {}

class NCAEngine {
  // model: the page's JSON (nca_fast/export/__init__.py, page_model); size: grid side in cells.
  // targets: at most this many render targets per pass (default: the browser's limit).
  constructor(canvas, model, size, preserve, targets) {
    const gl = canvas.getContext("webgl2", { antialias: false, preserveDrawingBuffer: !!preserve });
    if (!gl) throw new NCAError("this browser has no WebGL2, which the page needs to run the model");
    if (!gl.getExtension("EXT_color_buffer_float")) {
      throw new NCAError("this browser's WebGL2 cannot render to float textures " +
        "(EXT_color_buffer_float), which the page needs to hold the state");
    }
    this.gl = gl;
    this.canvas = canvas;
    const C = model.channels;
    this.m = {
      channels: C, groups: Math.ceil(C / 4), hidden: model.hidden, filters: model.filters,
      padding: model.padding, alphaChannel: model.alpha_channel, aliveThreshold: model.alive_threshold,
      alphaGroup: Math.floor(model.alpha_channel / 4), alphaComponent: model.alpha_channel % 4,
    };
    this.model = model;
    const G = this.m.groups;
    const maxTex = gl.getParameter(gl.MAX_TEXTURE_SIZE);
    const maxView = gl.getParameter(gl.MAX_VIEWPORT_DIMS);
    const limit = Math.min(maxTex, maxView[0], maxView[1]);
    if (size > limit) {
      throw new NCAError("a " + size + " x " + size + " grid is larger than this browser's " +
        "WebGL texture limit of " + limit + " x " + limit + " cells; choose a smaller size");
    }
    const [ww, wh] = model.weights_shape;
    if (ww > maxTex || wh > maxTex) {
      throw new NCAError("the model's weights need a " + ww + " x " + wh + " texture, larger " +
        "than this browser's WebGL texture limit of " + maxTex);
    }
    const units = gl.getParameter(gl.MAX_TEXTURE_IMAGE_UNITS);
    if (2 * G > units) {
      throw new NCAError("the model's " + C + " channels need " + 2 * G + " texture units; " +
        "this browser has " + units);
    }
    this.size = size;
    this.chunk = Math.min(gl.getParameter(gl.MAX_DRAW_BUFFERS), gl.getParameter(gl.MAX_COLOR_ATTACHMENTS),
      targets || Infinity);
    this.weights = this._texture(ww, wh, decodeFloats(model.weights));
    this.sets = [0, 1, 2].map(() => Array.from({ length: G }, () => this._texture(size, size, null)));
    this.fb = gl.createFramebuffer();
    const quad = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, quad);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    this.vao = gl.createVertexArray();
    gl.bindVertexArray(this.vao);
    gl.enableVertexAttribArray(0);
    gl.vertexAttribPointer(0, 2, gl.FLOAT, false, 0, 0);
    const parts = (make) => {
      const out = [];
      for (let g0 = 0; g0 < G; g0 += this.chunk) {
        const g1 = Math.min(G, g0 + this.chunk);
        out.push({ g0, g1, prog: this._program(make(this.m, g0, g1)) });
      }
      return out;
    };
    this.updatePasses = parts(NCAShaders.update);
    this.alivePasses = model.alive_threshold === null ? null : parts(NCAShaders.alive);
    this.erasePasses = parts(NCAShaders.erase);
    this.displayProg = this._program(NCAShaders.display(this.m));
    this.setSeed(0);
    this.reset();
  }

  _texture(w, h, data) {
    const gl = this.gl;
    const tex = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, tex);
    gl.texStorage2D(gl.TEXTURE_2D, 1, gl.RGBA32F, w, h);
    for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) {
      gl.texParameteri(gl.TEXTURE_2D, p, gl.NEAREST);
    }
    for (const p of [gl.TEXTURE_WRAP_S, gl.TEXTURE_WRAP_T]) {
      gl.texParameteri(gl.TEXTURE_2D, p, gl.CLAMP_TO_EDGE);
    }
    if (data) gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, w, h, gl.RGBA, gl.FLOAT, data);
    return tex;
  }

  _program(fragment) {
    const gl = this.gl;
    const compile = (type, src) => {
      const sh = gl.createShader(type);
      gl.shaderSource(sh, src);
      gl.compileShader(sh);
      if (!gl.getShaderParameter(sh, gl.COMPILE_STATUS)) {
        throw new NCAError("a shader did not compile: " + gl.getShaderInfoLog(sh));
      }
      return sh;
    };
    const prog = gl.createProgram();
    gl.attachShader(prog, compile(gl.VERTEX_SHADER, NCAShaders.VERTEX));
    gl.attachShader(prog, compile(gl.FRAGMENT_SHADER, fragment));
    gl.bindAttribLocation(prog, 0, "pos");
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) {
      throw new NCAError("a shader program did not link: " + gl.getProgramInfoLog(prog));
    }
    prog.loc = {};
    const n = gl.getProgramParameter(prog, gl.ACTIVE_UNIFORMS);
    for (let i = 0; i < n; i++) {
      const name = gl.getActiveUniform(prog, i).name;
      prog.loc[name] = gl.getUniformLocation(prog, name);
    }
    return prog;
  }

  // Binds the textures of `named` ({prefix: [textures]}) and the weights to `prog`'s samplers.
  _bind(prog, named) {
    const gl = this.gl;
    gl.useProgram(prog);
    let unit = 0;
    const bindOne = (name, tex) => {
      if (!(name in prog.loc)) return;
      gl.activeTexture(gl.TEXTURE0 + unit);
      gl.bindTexture(gl.TEXTURE_2D, tex);
      gl.uniform1i(prog.loc[name], unit++);
    };
    for (const [prefix, texs] of Object.entries(named)) {
      texs.forEach((t, g) => bindOne(prefix + g, t));
    }
    bindOne("W", this.weights);
    if ("size" in prog.loc) gl.uniform2i(prog.loc.size, this.size, this.size);
  }

  _draw(pass, outputs) {
    const gl = this.gl;
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.fb);
    const bufs = [];
    for (let i = 0; i < this.chunk; i++) {
      const g = pass.g0 + i;
      const tex = g < pass.g1 ? outputs[g] : null;
      gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + i, gl.TEXTURE_2D, tex, 0);
      if (tex) bufs.push(gl.COLOR_ATTACHMENT0 + i);
    }
    gl.drawBuffers(bufs);
    gl.viewport(0, 0, this.size, this.size);
    gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
  }

  // The update mask's key: the seed (an integer below 2**63, given as a decimal string or number).
  setSeed(seed) {
    const s = BigInt(seed);
    if (s < 0n || s >= (1n << 63n)) {
      throw new NCAError("seed: expected an integer in [0, 2**63), got " + seed);
    }
    this.seed = s;
    this.key = [Number(s & 0xFFFFFFFFn), Number(s >> 32n)];
  }

  // The seed state (nca_fast.reference.seed_state): zero but the centre cell (H // 2, W // 2),
  // whose channels alpha..C-1 are 1. Step counting restarts at 0.
  reset() {
    const gl = this.gl, n = this.size, C = this.m.channels;
    const cy = Math.floor(n / 2), cx = Math.floor(n / 2);
    this.sets[0].forEach((tex, g) => {
      const data = new Float32Array(n * n * 4);
      for (let i = 0; i < 4; i++) {
        const c = 4 * g + i;
        if (c < C && c >= this.m.alphaChannel) data[(cy * n + cx) * 4 + i] = 1;
      }
      gl.bindTexture(gl.TEXTURE_2D, tex);
      gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, n, n, gl.RGBA, gl.FLOAT, data);
    });
    this.cur = 0;
    this.t = 0;
  }

  // One NCA step with the masks of step `this.t` (then this.t += 1).
  step() {
    const gl = this.gl, S = this.sets[this.cur], U = this.sets[(this.cur + 1) % 3];
    gl.bindVertexArray(this.vao);
    for (const pass of this.updatePasses) {
      this._bind(pass.prog, { S });
      gl.uniform2ui(pass.prog.loc.key, this.key[0], this.key[1]);
      gl.uniform1ui(pass.prog.loc.threshold, this.model.fire_threshold);
      gl.uniform1ui(pass.prog.loc.t, this.t >>> 0);
      if (this.alivePasses) gl.uniform1f(pass.prog.loc.aliveThreshold, this.model.alive_threshold);
      this._draw(pass, U);
    }
    if (this.alivePasses) {
      const T = this.sets[(this.cur + 2) % 3];
      for (const pass of this.alivePasses) {
        this._bind(pass.prog, { S, U });
        gl.uniform1f(pass.prog.loc.aliveThreshold, this.model.alive_threshold);
        this._draw(pass, T);
      }
      this.cur = (this.cur + 2) % 3;
    } else {
      this.cur = (this.cur + 1) % 3;
    }
    this.t += 1;
  }

  // Erases the disc of `radius` cells around grid point (x, y) (x right, y down, in cells).
  erase(x, y, radius) {
    const gl = this.gl, S = this.sets[this.cur], T = this.sets[(this.cur + 1) % 3];
    gl.bindVertexArray(this.vao);
    for (const pass of this.erasePasses) {
      this._bind(pass.prog, { S });
      gl.uniform2f(pass.prog.loc.centre, x, y);
      gl.uniform1f(pass.prog.loc.radius, radius);
      this._draw(pass, T);
    }
    this.cur = (this.cur + 1) % 3;
  }

  // Draws the grid's cells [x0, x0 + span) x [y0, y0 + span) over the whole canvas.
  draw(x0, y0, span) {
    const gl = this.gl, prog = this.displayProg;
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.bindVertexArray(this.vao);
    gl.useProgram(prog);
    this.sets[this.cur].forEach((tex, g) => {
      gl.activeTexture(gl.TEXTURE0 + g);
      gl.bindTexture(gl.TEXTURE_2D, tex);
      gl.uniform1i(prog.loc["S" + g + "_"], g);
    });
    gl.uniform2i(prog.loc.size, this.size, this.size);
    gl.uniform4f(prog.loc.view, x0, y0, span, span);
    gl.uniform2f(prog.loc.canvas, this.canvas.width, this.canvas.height);
    gl.viewport(0, 0, this.canvas.width, this.canvas.height);
    gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
  }

  // The state as a C x H x W Float32Array (C-major, row 0 first).
  read() {
    const gl = this.gl, n = this.size, C = this.m.channels;
    const out = new Float32Array(C * n * n), buf = new Float32Array(n * n * 4);
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.fb);
    for (let i = 1; i < this.chunk; i++) {
      gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + i, gl.TEXTURE_2D, null, 0);
    }
    this.sets[this.cur].forEach((tex, g) => {
      gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, tex, 0);
      gl.readBuffer(gl.COLOR_ATTACHMENT0);
      gl.readPixels(0, 0, n, n, gl.RGBA, gl.FLOAT, buf);
      for (let i = 0; i < 4 && 4 * g + i < C; i++) {
        const plane = out.subarray((4 * g + i) * n * n, (4 * g + i + 1) * n * n);
        for (let j = 0; j < n * n; j++) plane[j] = buf[4 * j + i];
      }
    });
    return out;
  }

  // Waits until every step sent so far has run: reading one value back waits for the GPU (a
  // browser may return from gl.finish() before the work is done).
  finish() {
    const gl = this.gl;
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.fb);
    for (let i = 1; i < this.chunk; i++) {
      gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + i, gl.TEXTURE_2D, null, 0);
    }
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, this.sets[this.cur][0], 0);
    gl.readBuffer(gl.COLOR_ATTACHMENT0);
    gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.FLOAT, new Float32Array(4));
  }
}

function decodeFloats(b64) {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

function encodeFloats(arr) {
  const bytes = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}
