/**
 * libvirt `virsh save` images: a 92-byte header, the domain XML (and optionally a cookie), then
 * the raw QEMU migration stream at 92 + data_len. libvirt writes the header in host byte order
 * and byte-swaps it on load when the version looks foreign; we do the same.
 */
import { CorruptInputError, UnsupportedError, check } from '../../util/errors.js';
import { PAGE_SIZE } from '../../util/page.js';
import type { SnapshotBytes } from './snapshot-bytes.js';
import {
  LIBVIRT_FORMATS,
  LIBVIRT_HEADER_SIZE,
  LIBVIRT_MAGIC,
  LIBVIRT_MAX_DATA,
  LIBVIRT_PARTIAL_MAGIC,
  LIBVIRT_VERSIONS,
} from './format.js';

export interface LibvirtSaveHeader {
  version: number;
  /** Length of the XML + cookie area that follows the header. */
  dataLen: number;
  wasRunning: boolean;
  /** Domain XML (up to its NUL terminator). */
  xml: string;
  /** Where the QEMU stream starts: 92 + dataLen. */
  streamOffset: number;
}

/** Reads the header if the source starts with libvirt's magic; null for anything else. */
export async function readLibvirtHeader(source: SnapshotBytes): Promise<LibvirtSaveHeader | null> {
  if (source.size < 16) return null;
  const magicBuf = Buffer.alloc(16);
  await source.readAt(magicBuf, 0, 16, 0);
  const magic = magicBuf.toString('latin1');
  if (magic === LIBVIRT_PARTIAL_MAGIC) {
    throw new CorruptInputError('libvirt save image is unfinished (magic LibvirtQemudPart): the save was interrupted', {
      offset: 0,
    });
  }
  if (magic !== LIBVIRT_MAGIC) return null;

  check(source.size >= LIBVIRT_HEADER_SIZE, 'libvirt save header truncated', {
    offset: source.size,
    needed: LIBVIRT_HEADER_SIZE,
  });
  const h = Buffer.alloc(LIBVIRT_HEADER_SIZE);
  await source.readAt(h, 0, LIBVIRT_HEADER_SIZE, 0);

  let le = true;
  let version = h.readUInt32LE(16);
  if (!LIBVIRT_VERSIONS.includes(version) && LIBVIRT_VERSIONS.includes(h.readUInt32BE(16))) {
    le = false;
    version = h.readUInt32BE(16);
  }
  if (!LIBVIRT_VERSIONS.includes(version)) {
    throw new UnsupportedError(`libvirt save header version ${version} is not supported (known: 1, 2)`, {
      offset: 16,
      version,
    });
  }
  const u32 = (at: number): number => (le ? h.readUInt32LE(at) : h.readUInt32BE(at));
  const dataLen = u32(20);
  const wasRunning = u32(24);
  const compressed = u32(28);
  const cookieOffset = u32(32);

  if (compressed !== 0) {
    const format = LIBVIRT_FORMATS[compressed] ?? `format #${compressed}`;
    throw new UnsupportedError(
      `libvirt save image is compressed (${format}); save it uncompressed ` +
        '(save_image_format = "raw" in /etc/libvirt/qemu.conf) and try again',
      { offset: 28, compressed, format },
    );
  }
  const fits = dataLen <= LIBVIRT_MAX_DATA && LIBVIRT_HEADER_SIZE + dataLen <= source.size;
  check(fits, 'libvirt save header: XML length runs past the end of the file', {
    offset: 20,
    dataLen,
    size: source.size,
  });
  check(cookieOffset <= dataLen, 'libvirt save header: cookie offset outside the XML area', {
    offset: 32,
    cookieOffset,
    dataLen,
  });

  const data = Buffer.alloc(dataLen);
  await source.readAt(data, 0, dataLen, LIBVIRT_HEADER_SIZE);
  const xmlEnd = cookieOffset > 0 ? cookieOffset : dataLen;
  const nul = data.subarray(0, xmlEnd).indexOf(0);
  const xml = data.subarray(0, nul >= 0 ? nul : xmlEnd).toString('utf8');

  return { version, dataLen, wasRunning: wasRunning !== 0, xml, streamOffset: LIBVIRT_HEADER_SIZE + dataLen };
}

/** Builds a libvirt header + XML area around a stream (tests, and tools that hand images to libvirt). */
export function buildLibvirtHeader(xml: string, wasRunning: boolean): Buffer {
  const xmlBytes = Buffer.from(xml, 'utf8');
  // libvirt pads the XML area so the stream starts on a page boundary-ish; any padding is valid.
  const pad = (PAGE_SIZE - ((LIBVIRT_HEADER_SIZE + xmlBytes.length + 1) % PAGE_SIZE)) % PAGE_SIZE;
  const dataLen = xmlBytes.length + 1 + pad;
  const out = Buffer.alloc(LIBVIRT_HEADER_SIZE + dataLen);
  out.write(LIBVIRT_MAGIC, 0, 'latin1');
  out.writeUInt32LE(2, 16);
  out.writeUInt32LE(dataLen, 20);
  out.writeUInt32LE(wasRunning ? 1 : 0, 24);
  out.writeUInt32LE(0, 28);
  out.writeUInt32LE(0, 32);
  xmlBytes.copy(out, LIBVIRT_HEADER_SIZE);
  return out;
}
