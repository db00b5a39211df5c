/**
 * Reading a small input file named by a user or a package (a VM spec, a snapshot's vm.json):
 * opened non-blocking (a FIFO never blocks), refused unless a regular file of at most `max`
 * bytes, so a special file or a huge one cannot hang or exhaust the process.
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { CorruptInputError, NotFoundError } from './errors.js';

export async function readInputFile(path: string, max: number, what: string): Promise<Buffer> {
  let h;
  try {
    h = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw new NotFoundError(`${what} ${path} cannot be read: ${(err as Error).message}`, { path });
  }
  try {
    const st = await h.stat();
    if (!st.isFile()) throw new NotFoundError(`${what} ${path} is not a regular file`, { path });
    if (st.size > max) throw new CorruptInputError(`${what} ${path} is too large (${st.size} bytes)`, { path });
    return await h.readFile();
  } finally {
    await h.close();
  }
}
