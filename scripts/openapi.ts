/** Writes docs/openapi.json: the document the server serves (npm run openapi; a test checks it). */
import { writeFileSync } from 'node:fs';
import { openApiDocument } from '../src/service/api-spec.js';
import { VERSION } from '../src/util/version.js';

writeFileSync(
  new URL('../../docs/openapi.json', import.meta.url),
  JSON.stringify(openApiDocument(VERSION), null, 2) + '\n',
);
