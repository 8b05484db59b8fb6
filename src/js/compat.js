// Runs once per context, after the prelude, the first time a file of the app is loaded
// (see js/loader.rs). It turns compiled files into runners that accept every script
// form fazt apps are written in, and gives them `require` (require.js, compiled on
// first use). The helpers of each kind are in compat_handler.js and compat_worker.js.
// Every context that loads a file parses this one: keep it small.
(function (native) {
  "use strict";

  const dirname = (p) => {
    const i = p.lastIndexOf("/");
    return i < 0 ? "" : p.slice(0, i);
  };

  // --- require -------------------------------------------------------------------
  // The machinery (require.js) is compiled on the first call of any `require`.
  let makeRequireImpl = null;
  function makeRequire(from) {
    let impl = null;
    return function require(spec) {
      if (impl === null) {
        if (makeRequireImpl === null) makeRequireImpl = native.requireSupport()(native, dirname);
        impl = makeRequireImpl(from);
      }
      return impl(spec);
    };
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

  return Object.freeze({ entry });
});
