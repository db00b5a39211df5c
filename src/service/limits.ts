/**
 * Limits of a cloudlet: a counting semaphore for concurrent syntheses (tryAcquire, never a
 * queue: a request over the limit is answered 429 at once, before its body is read), and the
 * upload byte counter that cuts a request body off at the limit while it streams.
 */
import { UsageError } from '../util/errors.js';

export class Semaphore {
  private used = 0;

  constructor(readonly max: number) {}

  get inUse(): number {
    return this.used;
  }

  /** A release function, or undefined when all permits are taken. */
  tryAcquire(): (() => void) | undefined {
    if (this.used >= this.max) return undefined;
    this.used++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.used--;
    };
  }
}

/** Passes `body` through, failing (413) once more than `max` bytes came. */
export async function* limitBytes(body: AsyncIterable<Uint8Array>, max: number): AsyncGenerator<Uint8Array> {
  let n = 0;
  for await (const chunk of body) {
    n += chunk.byteLength;
    if (n > max)
      throw new UsageError(`the upload is larger than the ${max} bytes allowed`, { http_status: 413, max_upload: max });
    yield chunk;
  }
}
