// Runs once in every fresh context, before any user code. It builds the public `fazt`,
// `console` and (in workers) `job` objects on top of the hidden native `__host`, then
// removes `__host` so user code only sees the documented API.
(function (host, isJob) {
  "use strict";
  const define = (obj, name, value) =>
    Object.defineProperty(obj, name, { value, writable: true, configurable: true, enumerable: false });

  // Array callbacks run as JS, not from native code, so the interruptible run loop covers
  // loops inside them (see js/runtime.rs). Semantics follow the spec for arrays and
  // array-likes; holes are skipped like the built-ins do.
  const AP = Array.prototype;
  const toLen = (o) => { const n = Number(o.length); return n > 0 ? Math.min(Math.floor(n), 2 ** 53 - 1) : 0; };
  // Callbacks are called directly (not via Function.prototype.call, which is native and
  // would run them outside the budgeted loop); a thisArg binds once, up front.
  const needFn = (f, t, what) => {
    if (typeof f !== "function") throw new TypeError(what + ": callback is not a function");
    return t === undefined ? f : f.bind(t);
  };
  define(AP, "forEach", function forEach(f, t) {
    const g = needFn(f, t, "Array.prototype.forEach"); const o = Object(this), n = toLen(o);
    for (let i = 0; i < n; i++) if (i in o) g(o[i], i, o);
  });
  define(AP, "map", function map(f, t) {
    const g = needFn(f, t, "Array.prototype.map"); const o = Object(this), n = toLen(o), r = new Array(n);
    for (let i = 0; i < n; i++) if (i in o) r[i] = g(o[i], i, o);
    return r;
  });
  define(AP, "filter", function filter(f, t) {
    const g = needFn(f, t, "Array.prototype.filter"); const o = Object(this), n = toLen(o), r = [];
    for (let i = 0; i < n; i++) if (i in o) { const v = o[i]; if (g(v, i, o)) r.push(v); }
    return r;
  });
  define(AP, "some", function some(f, t) {
    const g = needFn(f, t, "Array.prototype.some"); const o = Object(this), n = toLen(o);
    for (let i = 0; i < n; i++) if (i in o && g(o[i], i, o)) return true;
    return false;
  });
  define(AP, "every", function every(f, t) {
    const g = needFn(f, t, "Array.prototype.every"); const o = Object(this), n = toLen(o);
    for (let i = 0; i < n; i++) if (i in o && !g(o[i], i, o)) return false;
    return true;
  });
  define(AP, "find", function find(f, t) {
    const g = needFn(f, t, "Array.prototype.find"); const o = Object(this), n = toLen(o);
    for (let i = 0; i < n; i++) { const v = o[i]; if (g(v, i, o)) return v; }
    return undefined;
  });
  define(AP, "findIndex", function findIndex(f, t) {
    const g = needFn(f, t, "Array.prototype.findIndex"); const o = Object(this), n = toLen(o);
    for (let i = 0; i < n; i++) if (g(o[i], i, o)) return i;
    return -1;
  });
  const reducer = (name, fromEnd) => function (f) {
    const g = needFn(f, undefined, "Array.prototype." + name); const o = Object(this), n = toLen(o);
    let i = fromEnd ? n - 1 : 0; const step = fromEnd ? -1 : 1; let acc; let have = arguments.length > 1;
    if (have) acc = arguments[1];
    for (; i >= 0 && i < n; i += step) {
      if (!(i in o)) continue;
      if (!have) { acc = o[i]; have = true; continue; }
      acc = g(acc, o[i], i, o);
    }
    if (!have) throw new TypeError("Reduce of empty array with no initial value");
    return acc;
  };
  define(AP, "reduce", reducer("reduce", false));
  define(AP, "reduceRight", reducer("reduceRight", true));
  define(AP, "flatMap", function flatMap(f, t) {
    const g = needFn(f, t, "Array.prototype.flatMap"); const o = Object(this), n = toLen(o), r = [];
    for (let i = 0; i < n; i++) {
      if (!(i in o)) continue;
      const v = g(o[i], i, o);
      if (Array.isArray(v)) { for (let j = 0; j < v.length; j++) if (j in v) r.push(v[j]); } else r.push(v);
    }
    return r;
  });

  // A stable merge sort, so comparators also run inside the interruptible loop.
  // Like the built-in: undefined sorts last, holes are compacted, the default order
  // compares strings.
  const defaultCompare = (a, b) => { const x = String(a), y = String(b); return x < y ? -1 : x > y ? 1 : 0; };
  define(AP, "sort", function sort(cmp) {
    if (cmp !== undefined && typeof cmp !== "function") throw new TypeError("The comparison function must be either a function or undefined");
    const c = cmp === undefined ? defaultCompare : cmp;
    const o = Object(this), n = toLen(o);
    const vals = []; let undef = 0;
    for (let i = 0; i < n; i++) if (i in o) { const v = o[i]; if (v === undefined) undef++; else vals.push(v); }
    let a = vals, b = new Array(vals.length);
    for (let w = 1; w < a.length; w *= 2) {
      for (let lo = 0; lo < a.length; lo += 2 * w) {
        const mid = Math.min(lo + w, a.length), hi = Math.min(lo + 2 * w, a.length);
        let i = lo, j = mid, k = lo;
        while (i < mid && j < hi) { const r = Number(c(a[j], a[i])); b[k++] = r < 0 ? a[j++] : a[i++]; }
        while (i < mid) b[k++] = a[i++];
        while (j < hi) b[k++] = a[j++];
      }
      const t = a; a = b; b = t;
    }
    let k = 0;
    for (; k < a.length; k++) o[k] = a[k];
    for (let u = 0; u < undef; u++) o[k++] = undefined;
    for (; k < n; k++) delete o[k];
    return o;
  });

  const fmt = (args) => args.map((a) => {
    if (typeof a === "string") return a;
    if (a instanceof Error) return String(a);
    try { const s = JSON.stringify(a); return s === undefined ? String(a) : s; } catch (e) { return String(a); }
  }).join(" ");
  const consoleObj = {};
  for (const level of ["log", "info", "warn", "error", "debug"]) {
    define(consoleObj, level, function () { host.log(level, fmt(Array.prototype.slice.call(arguments))); });
  }
  globalThis.console = consoleObj;

  const parse = (s) => (s === null || s === undefined ? null : JSON.parse(s));
  const kv = Object.freeze({
    get: (key) => parse(host.kvGet(key)),
    set: (key, value, ttlMs) => {
      const s = JSON.stringify(value);
      if (s === undefined) throw new TypeError("fazt.storage.kv.set: value must be JSON-serialisable");
      host.kvSet(key, s, ttlMs);
    },
    delete: (key) => host.kvDelete(key),
    list: (prefix) => host.kvList(prefix === undefined ? "" : prefix),
  });

  const worker = Object.freeze({
    spawn: (path, opts) => host.workerSpawn(path, opts === undefined ? {} : opts),
    get: (id) => host.workerGet(id),
    list: (filter) => host.workerList(filter === undefined ? {} : filter),
    cancel: (id) => host.workerCancel(id),
    wait: (id, opts) => host.workerWait(id, opts === undefined ? {} : opts),
  });

  const realtime = Object.freeze({
    broadcast: (channel, data) => host.rtBroadcast(channel, JSON.stringify(data === undefined ? null : data)),
    broadcastAll: (data) => host.rtBroadcastAll(JSON.stringify(data === undefined ? null : data)),
    count: (channel) => host.rtCount(channel),
    subscribers: (channel) => host.rtSubscribers(channel),
  });

  globalThis.fazt = Object.freeze({
    app: Object.freeze({ name: host.appName }),
    storage: Object.freeze({ kv }),
    worker,
    realtime,
  });

  if (isJob) {
    // A worker context is reused for the next job of the same app, so the `job`
    // object is made per run; the natives answer for the job running now.
    globalThis.__fazt_make_job = function () {
      const info = host.jobInfo();
      const job = {};
      Object.defineProperty(job, "id", { value: info[0], enumerable: true });
      Object.defineProperty(job, "attempt", { value: info[1], enumerable: true });
      Object.defineProperty(job, "data", { value: parse(info[2]), enumerable: true, writable: true });
      Object.defineProperty(job, "cancelled", { get: () => host.jobCancelled(), enumerable: true });
      define(job, "progress", (n) => host.jobProgress(n));
      define(job, "log", function () { host.log("job", fmt(Array.prototype.slice.call(arguments))); });
      define(job, "checkpoint", (value) => {
        const s = JSON.stringify(value);
        if (s === undefined) throw new TypeError("job.checkpoint: value must be JSON-serialisable");
        host.jobCheckpoint(s);
      });
      define(job, "getCheckpoint", () => parse(host.jobGetCheckpoint()));
      define(job, "sleep", (ms) => host.jobSleep(ms));
      return Object.freeze(job);
    };
  }
  delete globalThis.__host;
  delete globalThis.__isJob;
})(globalThis.__host, globalThis.__isJob);
