// Runs once per context, after the prelude, the first time a file of the app is loaded
// (see js/loader.rs). It turns compiled files into runners that accept every script
// form fazt apps are written in, implements `require` over the app's own files, and
// adds upstream fazt's helpers: `respond` in handlers; `sleep`, `job.memory`,
// `job.daemon`, `job.checkpoint()` and clamping `job.progress` in workers.
//
// Functions are always called directly, never through Function.prototype.call/apply:
// a native call would run them outside the interruptible run loop.
(function (native, kind) {
  "use strict";
  const define = (obj, name, value) =>
    Object.defineProperty(obj, name, { value, writable: true, configurable: true, enumerable: false });
  const isWorker = kind === "worker";

  const dirname = (p) => {
    const i = p.lastIndexOf("/");
    return i < 0 ? "" : p.slice(0, i);
  };
  const show = (v) => {
    try {
      const s = typeof v === "string" ? JSON.stringify(v) : String(v);
      return s.length > 80 ? s.slice(0, 77) + "..." : s;
    } catch (e) {
      return typeof v;
    }
  };

  // --- require -------------------------------------------------------------------
  // Modules loaded in this context, by app path. A context never outlives its
  // deployment (a deploy replaces it), so neither does this cache.
  const cache = new Map();
  // `from` + spec → the app path it resolved to, so a hit needs no store read.
  const resolved = new Map();

  // The app path `spec` names, seen from file `from`; only ./ and ../ paths inside
  // the app, each refusal naming the path.
  function resolveBase(spec, from) {
    const where = "require(" + show(spec) + ") in " + from;
    if (typeof spec !== "string" || spec === "") {
      throw new TypeError(where + ": give the path of one of the app's files, e.g. require('./lib/util.js')");
    }
    if (spec.startsWith("node:")) {
      throw new Error(where + ": Node's built-in modules are not available in fazt; only the app's own .js and .json files can be required");
    }
    if (spec.startsWith("/")) {
      throw new Error(where + ": absolute paths are not allowed; use a path relative to " + from + ", such as './lib/x.js' or '../lib/x.js'");
    }
    if (!spec.startsWith("./") && !spec.startsWith("../")) {
      throw new Error(where + ": packages are not available in fazt; require the app's own files with a relative path ('./x' or '../lib/x')");
    }
    const parts = dirname(from) === "" ? [] : dirname(from).split("/");
    const segs = spec.split("/");
    for (let i = 0; i < segs.length; i++) {
      const seg = segs[i];
      if (seg === "." || (seg === "" && i === segs.length - 1)) continue;
      if (seg === "" || seg.indexOf("\\") >= 0) {
        throw new Error(where + ": malformed path");
      }
      if (seg === "..") {
        if (parts.length === 0) throw new Error(where + ": the path leads outside the app");
        parts.pop();
      } else {
        parts.push(seg);
      }
    }
    if (parts.length === 0) throw new Error(where + ": the path names the app's root folder, not a file");
    return { base: parts.join("/"), dir: spec.endsWith("/") };
  }

  function load(spec, from) {
    const key = from + "\u0000" + spec;
    let path = resolved.get(key);
    if (path === undefined) {
      const { base, dir } = resolveBase(spec, from);
      const explicit = base.endsWith(".js") || base.endsWith(".json");
      const candidates = dir ? [base + "/index.js", base + "/index.json"]
        : explicit ? [base] : [base + ".js", base + ".json", base + "/index.js", base + "/index.json"];
      let source = null;
      for (let i = 0; i < candidates.length; i++) {
        if (cache.has(candidates[i])) { path = candidates[i]; break; }
        source = native.readModule(candidates[i]);
        if (source !== null) { path = candidates[i]; break; }
      }
      if (path === undefined) {
        const e = new Error("require(" + show(spec) + ") in " + from + ": no file " +
          candidates.join(" or ") + " in this app" +
          (explicit || dir ? "" : " (only .js and .json files can be required)"));
        e.code = "MODULE_NOT_FOUND";
        throw e;
      }
      resolved.set(key, path);
      if (!cache.has(path)) return evaluate(path, source);
    }
    const hit = cache.get(path);
    if (hit !== undefined) return hit.exports;
    return evaluate(path, native.readModule(path));
  }

  // Runs a module's body once; it is cached first, so a circular require sees the
  // exports as they are so far (as in Node). A body that throws is not cached.
  function evaluate(path, source) {
    if (source === null) throw new Error("require: " + path + " disappeared from the app while loading");
    const module = { id: path, filename: path, loaded: false, exports: {} };
    cache.set(path, module);
    try {
      if (path.endsWith(".json")) {
        try {
          module.exports = JSON.parse(source);
        } catch (e) {
          throw new SyntaxError(path + ": invalid JSON: " + e.message);
        }
      } else {
        const factory = native.compile(path, source);
        factory.bind(module.exports)(module.exports, makeRequire(path), module, path, dirname(path));
      }
    } catch (e) {
      cache.delete(path);
      throw e;
    }
    module.loaded = true;
    return module.exports;
  }

  function makeRequire(from) {
    const require = function require(spec) {
      return load(spec, from);
    };
    return require;
  }

  // --- where an error came from ----------------------------------------------------
  // Error messages reach users as "TypeError: x"; the file and line are only in the
  // stack. When the innermost app frame is in a required file, append it once, as the
  // run leaves user code (an error of the entry file itself already names the file
  // the user called, so its message stays as thrown).
  const located = new WeakSet();
  const FRAME = /\(([^()\s]+\.js(?:on)?):(\d+):\d+\)/;
  function locate(e, entryPath) {
    if (!(e instanceof Error) || located.has(e)) return e;
    located.add(e);
    const stack = typeof e.stack === "string" ? e.stack : "";
    const m = FRAME.exec(stack);
    if (m !== null && m[1] !== entryPath) {
      const at = m[1] + ":" + m[2];
      const msg = typeof e.message === "string" ? e.message : "";
      if (msg.indexOf(at) < 0) {
        try {
          e.message = msg + " (at " + at + ")";
        } catch (ignored) {
          // A frozen error keeps its message.
        }
      }
    }
    return e;
  }

  // --- entry files (api/*.js, workers/*.js) ------------------------------------------
  // `factory` is the file compiled as a function body with (exports, require, module,
  // __filename, __dirname, request|job, end), where `end` is called when the body runs
  // to its end (no top-level return) with its top-level `handler` function, if any.
  function entry(factory, path) {
    const dir = dirname(path);
    const require = makeRequire(path);
    // A body that exports a function is a CommonJS module: its body ran once and the
    // export is called from then on, keeping module state as Node does. Other bodies
    // are top-level code and run afresh on every call, so nothing of one run's
    // top-level scope is seen by the next.
    let exported = null;

    function body(arg) {
      const module = { id: path, filename: path, loaded: false, exports: {} };
      const initial = module.exports;
      let fell = false;
      let handler;
      const end = (h) => {
        fell = true;
        handler = h;
      };
      const out = factory.bind(initial)(initial, require, module, path, dir, arg, end);
      module.loaded = true;
      if (!fell) return out; // a top-level `return`
      const exp = module.exports;
      if (typeof exp === "function") {
        exported = exp;
        return exp(arg);
      }
      if (typeof handler === "function") return handler(arg);
      // Nothing callable: what the file exported, if anything.
      return exp === initial && Object.keys(initial).length === 0 ? undefined : exp;
    }

    return function run(arg) {
      let out;
      try {
        out = exported !== null ? exported(arg) : body(arg);
      } catch (e) {
        throw locate(e, path);
      }
      if (out instanceof Promise) {
        return out.then(undefined, (e) => {
          throw locate(e, path);
        });
      }
      return out;
    };
  }

  // --- handlers: respond -------------------------------------------------------------
  const status = (s) => {
    if (typeof s !== "number" || !Number.isInteger(s) || s < 100 || s > 599) {
      throw new TypeError("respond: the status must be a whole number from 100 to 599, not " + show(s));
    }
    return s;
  };
  // Upstream's helper: respond(body), respond(status), respond(status, body[, headers]).
  function respond(a, b, c) {
    const n = arguments.length;
    if (n === 0) return { status: 200, body: null };
    if (n === 1) return typeof a === "number" ? { status: status(a), body: null } : { status: 200, body: a };
    const r = { status: status(a), body: b === undefined ? null : b };
    if (c !== undefined) {
      if (c === null || typeof c !== "object") throw new TypeError("respond: headers must be an object");
      r.headers = c;
    }
    return r;
  }

  // --- workers: sleep and the extended job object ------------------------------------
  function sleep(ms) {
    if (typeof ms !== "number" || !(ms >= 0) || ms === Infinity) {
      throw new TypeError("sleep: ms must be a non-negative number of milliseconds, not " + show(ms));
    }
    native.sleep(ms);
  }

  if (isWorker) {
    define(globalThis, "sleep", sleep);
    const makeJob = globalThis.__fazt_make_job;
    globalThis.__fazt_make_job = function () {
      const base = makeJob();
      const d = Object.getOwnPropertyDescriptors(base);
      // Read from the store only if the code asks (most jobs never do).
      let config = null;
      const cfg = () => (config === null ? (config = native.jobConfig()) : config);
      d.memory = { get: () => cfg()[0], enumerable: true };
      d.daemon = { get: () => cfg()[1], enumerable: true };
      d.progress = {
        value: function progress(n) {
          if (typeof n !== "number" || !Number.isFinite(n)) {
            throw new TypeError("job.progress: give a finite number from 0 to 100 (others are clamped), not " + show(n));
          }
          base.progress(n < 0 ? 0 : n > 100 ? 100 : n);
        },
        writable: true,
        configurable: true,
      };
      // Upstream: checkpoint(value) saves, checkpoint() reads.
      d.checkpoint = {
        value: function checkpoint(value) {
          if (arguments.length === 0) return base.getCheckpoint();
          return base.checkpoint(value);
        },
        writable: true,
        configurable: true,
      };
      return Object.freeze(Object.create(Object.prototype, d));
    };
  } else {
    define(globalThis, "respond", respond);
  }

  return Object.freeze({ entry });
});
