/** The resumable URL fetcher (net/http-stream.ts), for layers above api/ (the service). */
export { HttpStream } from '../net/http-stream.js';
