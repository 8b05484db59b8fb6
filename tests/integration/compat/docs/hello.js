// workers/hello.js
job.progress(0.5);
return { message: 'done' };
