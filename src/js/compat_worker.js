// Worker contexts only, after compat.js: the global `sleep(ms)` and upstream's job
// object extras: `job.memory`, `job.daemon`, `job.checkpoint()` reading the checkpoint,
// and `job.progress` clamping to 0-100 (a TypeError for anything but a finite number).
(function (native) {
  "use strict";
  function sleep(ms) {
    if (typeof ms !== "number" || !(ms >= 0) || ms === Infinity) {
      throw new TypeError("sleep: ms must be a non-negative number of milliseconds, not " + String(ms));
    }
    native.sleep(ms);
  }
  Object.defineProperty(globalThis, "sleep", { value: sleep, writable: true, configurable: true });

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
          throw new TypeError("job.progress: give a finite number from 0 to 100 (others are clamped), not " + String(n));
        }
        base.progress(n < 0 ? 0 : n > 100 ? 100 : n);
      },
      writable: true,
      configurable: true,
    };
    d.checkpoint = {
      value: function checkpoint(value) {
        return arguments.length === 0 ? base.getCheckpoint() : base.checkpoint(value);
      },
      writable: true,
      configurable: true,
    };
    return Object.freeze(Object.create(Object.prototype, d));
  };
});
