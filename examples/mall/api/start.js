// Starts the mall simulator, or returns the one already running: `uniqueKey` makes
// every visitor share a single daemon. It stops by itself a minute after the last
// browser stops listening on the `mall` channel.
module.exports = function () {
  return fazt.worker.spawn("workers/simulator.js", {
    daemon: true,
    uniqueKey: "simulator",
    idleTimeout: "1m",
    idleChannel: "mall",
  });
};
