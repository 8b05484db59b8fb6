// Worker with idle timeout
fazt.worker.spawn('workers/sim.js', {
    daemon: true,
    idleTimeout: '1m',   // Stop if no listeners for 1 minute
    idleChannel: 'mall'  // Monitor this WebSocket channel
});
