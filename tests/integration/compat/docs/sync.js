// workers/sync.js
module.exports = function(job) {
    let state = job.getCheckpoint() || { cursor: 0 };

    while (!job.cancelled) {
        job.progress(state.cursor);
        job.log('Processing...');

        // Save checkpoint for crash recovery
        job.checkpoint({ cursor: state.cursor });

        state.cursor++;
        sleep(1000);
    }

    return { processed: state.cursor };
};
